"""Shared test fixtures: paths to ../shared/data and a CPU-only JAX."""

import math
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
                 "test_export", "test_recipe", "test_sweep_postgres", "test_dashboard", "test_notebook", "test_router_bias",
                 "test_train", "test_precision")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))   # stable: file order otherwise


# -- models for the export tests (test_export, test_ondevice) -----------------------------------

def perturbed_model(cfg, seed=1):
    """Our model with every parameter and buffer redrawn: norm scales 1 + 0.2 N, vectors (biases,
    router selection bias) 0.1 N, matrices N / sqrt(fan_in)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moe_scaling.model.transformer import Transformer

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)

    def draw(path, v):
        if "scale" in jax.tree_util.keystr(path):
            x = 1 + 0.2 * rng.standard_normal(v.shape)
        elif v.ndim == 1:
            x = 0.1 * rng.standard_normal(v.shape)
        else:
            x = rng.standard_normal(v.shape) / np.sqrt(v.shape[-2])
        return jnp.asarray(x, jnp.float32)

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def quick_train(cfg, ckpt_dir, steps, data):
    """``steps`` steps of batch 4 x 32 on ``data`` into ``ckpt_dir``; returns the TrainConfig."""
    from moe_scaling.config import TrainConfig
    from moe_scaling.train.loop import train

    train_cfg = TrainConfig(tokens=steps * 4 * 32, batch_size=4, lr=3e-3, warmup=1, eval_every=steps,
                            eval_batches=1, log_every=steps, ckpt_every=steps, seed=0)
    result = train(cfg, train_cfg, data, ckpt_dir=ckpt_dir, progress=False)
    assert result.status == "completed"
    return train_cfg


def _export_data():
    from moe_scaling.config import DataConfig

    return DataConfig(corpus=str(SHARED_DATA / "text" / "tinyshakespeare" / "input.txt"), seq_len=32,
                      max_tokens=60_000)


EXPORT_DATA = _export_data()
"""The corpus the export tests train their quick runs on (the first 60k bytes of tinyshakespeare)."""


def export_cli(*args):
    """``moe-export ARGS`` in a fresh process: the CompletedProcess (returncode, stdout, stderr)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "moe_scaling.cli.export", *map(str, args)],
                          capture_output=True, text=True)


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard reads from the event files in ``folder`` (not its subfolders), by
    tag: ``[(step, value), ...]``, through TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})   # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_run_scalars(folder, *, steps: int, moe_layers: int, log_every: int | None = None) -> dict:
    """A run's event files hold every scalar of moe_scaling/train/events.py up to its last step."""
    s = tensorboard_scalars(folder)
    want = {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss"}
    if moe_layers:
        want |= {"moe/dropped_fraction", "train/aux_loss"} | {
            f"moe/load_max_over_mean/layer_{i}" for i in range(moe_layers)}
    assert want <= set(s), (folder, sorted(want - set(s)))
    assert not any(t.startswith("moe/") for t in s) or moe_layers, sorted(s)
    assert s["train/loss"][-1][0] == steps and s["eval/loss"][-1][0] == steps
    if log_every:
        assert [st for st, _ in s["train/loss"]] == list(range(log_every, steps + 1, log_every))
    for tag, rows in s.items():
        assert all(math.isfinite(v) for _, v in rows), tag
    for i in range(moe_layers):                       # max / mean load: 1 (balanced) .. n_experts
        assert all(v >= 1.0 - 1e-6 for _, v in s[f"moe/load_max_over_mean/layer_{i}"])
    return s
