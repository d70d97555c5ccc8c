"""moe-scaling: which Mixture-of-Experts architecture gives the lowest loss for a given on-device
memory and compute budget? See README.md for the pipeline and DESIGN notes for the formulas."""

__version__ = "0.1.0"
