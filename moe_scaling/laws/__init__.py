"""Scaling laws: the registry of forms (:mod:`.registry`) and robust fitting with intervals (:mod:`.fit`)."""
