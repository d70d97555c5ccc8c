"""Figures (:mod:`.figures`)."""
