"""Shared test fixtures: paths to ../shared/data and a CPU-only JAX."""

import math
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# -- tolerances -----------------------------------------------------------------------------------
# Every tolerance in these tests has a stated source of its size, one of:
#   * float round-off, for two computations of the same mathematics: F32_TOL / F64_TOL below, or a
#     bound derived at the test (bf16: 8 significand bits, relative 2^-9 = 0.002 per rounding);
#   * Monte Carlo error, for a statistic of random draws (a bootstrap percentile: its standard error
#     from the draws themselves, moe_scaling.laws.noise.percentile_mc_se);
#   * seed-to-seed spread, for a trained loss: measured on this code with many seeds (never a 3-seed
#     range), recorded where it is used with the command that measures it;
#   * the rounding of a published figure (6.9B is +-0.05B) or the resolution of a search;
#   * the scale of the quantity itself (an expert-load ratio between 1, uniform, and 4, collapsed).
# None is read off one machine's output: the CPUs this project runs on differ (AVX2-only and AVX-512
# with bf16 instructions), and XLA's kernels sum in a different order on each, so any result that
# passes through XLA differs between them in its last bits (and MoE routing can amplify that).
# The suite is checked on the default ISA and under XLA_FLAGS=--xla_cpu_max_isa=AVX2.

# float32 carries 24 significand bits (eps = 1.19e-7). Summed in another order (another kernel, vector
# width or thread split), a length-K dot product moves by ~sqrt(K) eps of its magnitude (at most K eps).
# The tiny models here reduce over K <= 512 through a few layers to values of order 1-10 (losses,
# logits): sqrt(512) x 1.19e-7 x 10 = 2.7e-5 worst-typical for logits, 3e-6 for a loss of ~5 averaged
# over hundreds of tokens. F32_TOL = 1e-5 compares losses and activations of that size (measured
# differences: 5e-7 to 1.4e-6 on AVX2 and AVX-512 CPUs); logits of whole models compared with another
# framework use 1e-4 (test_export, test_ondevice), one decade above the worst-typical bound.
F32_TOL = 1e-5
# float64 (eps = 2.2e-16): the same sums in another order agree to ~1e-13 relative for the
# few-thousand-term reductions here; F64_TOL = 1e-12 leaves a decade.
F64_TOL = 1e-12


def seed_spread(case: str) -> dict:
    """The seed-to-seed spread of a test configuration's trained losses, as bench/seed_spread.py
    measured it (16 or 8 seeds; the JSON records the machine): the source of every tolerance on a
    trained loss that two code paths compute with different rounding."""
    import json

    return json.loads((REPO / "bench" / "seed_spread.json").read_text())[case]

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
                 "test_train", "test_precision", "test_gpu_bench")


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


def damage_checkpoint(step_dir: Path, how: str) -> Path:
    """Damage one orbax checkpoint as a bad disk would: its largest array data file (under a
    ``d/`` folder) cut to half its size (``truncate``) or gone (``delete``). Returns that file."""
    data = max((p for p in Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    if how == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    else:
        data.unlink()
    return data


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
