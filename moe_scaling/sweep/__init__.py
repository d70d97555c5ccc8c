"""Grids of runs: grid files (:mod:`.grid`), the work queue and runner (:mod:`.runner`), tables (:mod:`.results`)."""
