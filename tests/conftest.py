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

# The modules that take longest on CI's 2-core machine, longest first. pytest-xdist runs each module
# on one worker (`--dist loadscope`, pyproject.toml) in the order collected: starting the long ones
# first keeps both workers busy until the end instead of leaving one module running alone.
# Only the order changes; a module missing here runs after these.
LONGEST_FIRST = ("test_sweep", "test_seed_batching", "test_model", "test_fit", "test_mesh", "test_routing",
                 "test_export", "test_recipe", "test_sweep_postgres", "test_notebook", "test_router_bias",
                 "test_train", "test_precision")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))   # stable: file order otherwise
