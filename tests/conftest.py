"""Shared test fixtures: paths to ../shared/data and a CPU-only JAX."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Property tests draw the same examples on every run: CI is reproducible, and a failure seen once is
# seen again (hypothesis' database still replays failures locally).
from hypothesis import settings  # noqa: E402

settings.register_profile("moe_scaling", derandomize=True)
settings.load_profile("moe_scaling")
