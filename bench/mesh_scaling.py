"""Scaling of the fine-grained d256 MoE train step on a mesh of CPU host devices, at equal global batch.

    python bench/mesh_scaling.py               # timing + FLOPs + plans (run under flock /tmp/moe-timing.lock)
    python bench/mesh_scaling.py --no-timing   # FLOPs and plans only (compiles, no timed steps)

XLA_FLAGS is set here (4 host devices). Written to ``bench/mesh_scaling.json``:

* ``results``: tokens/s of the trainer's own jitted step (:mod:`moe_scaling.train.step`) on
  1 device, on ``data=2`` and on ``expert=2`` (two host devices each, 8 rows per device), the same
  global batch of 16 x 256 tokens, and ``ratio_vs_one_device``. The meshes alternate step by step
  (best of ``--steps`` each) so that load from other processes hits all alike. Both host "devices"
  share the same 2 cores, so 1.0 is the ideal here: the ratio measures the cost of the partitioned
  program and its collectives, not a speed-up.
* ``flops_per_device_ratio``: XLA's cost analysis of the compiled step (FLOPs of the partitioned,
  per-device program) on ``data=4`` over one device's; 0.25 is the ideal (the AdamW update of the
  replicated state is not divided). A compile-time count, not a timing.
* ``plans``: every ``bench/plans/*.json`` (``moe-train --plan --json`` outputs), per-device bytes of
  XLA's memory analysis beside the analytic estimate.
* ``cpu``: the machine (``moe_scaling.runtime.machine_info``: CPU model, ``isa``, ``bf16``, the flags
  that matter to XLA:CPU, an ``XLA_FLAGS`` ISA cap, the load).

The model is bench/moe_overhead.py's ``d256_e64_k8_fine`` (d_model 256, 2 layers, 64 experts of
width 128, top 8, capacity dispatch, float32, AdamW with clipping).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import moe_scaling  # noqa: E402,F401  (malloc settings before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from moe_scaling.config import MeshShape, ModelConfig, TrainConfig  # noqa: E402
from moe_scaling.runtime import machine_info  # noqa: E402
from moe_scaling.train.mesh import Placement  # noqa: E402
from moe_scaling.train.plan import step_flops  # noqa: E402
from moe_scaling.train.step import init_state, make_train_step  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = ModelConfig(vocab_size=256, n_layers=2, max_seq_len=256, d_model=256, n_heads=4, d_ff=1024,
                    n_experts=64, top_k=8, d_expert=128)
BATCH, SEQ = 16, 256
TIMED = (None, "data=2", "expert=2")
# The same benchmark before the token-local dispatch (commit fb03078, global sort on every device;
# tokens/s measured 2026-11-30 on this 2-core machine, FLOPs recomputed from that commit's code).
BEFORE = {"commit": "fb03078", "tokens_per_s": {"1 device": 2903, "data=2": 1632}, "data=2_ratio": 0.56,
          "flops_per_device_ratio": {"data=4": 0.785}}


def _train_cfg(mesh: str | None = None) -> TrainConfig:
    return TrainConfig(batch_size=BATCH, tokens=BATCH * SEQ * 100, dispatch="capacity", mesh=mesh)


def _setup(mesh: str | None):
    graphdef, state = init_state(MODEL, _train_cfg(), 100)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH, SEQ), dtype=np.int32)
    y = rng.integers(0, 256, (BATCH, SEQ), dtype=np.int32)
    placement = None
    if mesh:
        placement = Placement.create(MeshShape.parse(mesh), state)
        state = placement.put_state(state)
        x, y = placement.put_batch(x, y)
    else:
        x, y = jax.device_put(x), jax.device_put(y)
    step = make_train_step(graphdef, _train_cfg(), "capacity", placement)
    return {"compiled": step.lower(state, x, y).compile(), "state": state, "x": x, "y": y}


def timing(steps: int) -> list[dict]:
    """Best and median step of each mesh in :data:`TIMED`, alternating step by step."""
    rows = {m: _setup(m) for m in TIMED}
    times = {m: [] for m in rows}
    for _ in range(2):  # warm up
        for r in rows.values():
            r["state"], m = r["compiled"](r["state"], r["x"], r["y"])
            jax.block_until_ready(m)
    for _ in range(steps):
        for mesh, r in rows.items():
            t0 = time.perf_counter()
            r["state"], m = r["compiled"](r["state"], r["x"], r["y"])
            jax.block_until_ready(m)
            times[mesh].append(time.perf_counter() - t0)
    one = BATCH * SEQ / min(times[None])
    return [{"mesh": mesh or "1 device", "devices": MeshShape.parse(mesh).size, "global_batch": [BATCH, SEQ],
             "best_step_ms": 1e3 * min(t), "median_step_ms": 1e3 * float(np.median(t)),
             "tokens_per_s": BATCH * SEQ / min(t), "ratio_vs_one_device": BATCH * SEQ / min(t) / one}
            for mesh, t in times.items()]


def plans(folder: Path = HERE / "plans") -> list[dict]:
    """The committed ``moe-train --plan --json`` outputs (``MODEL_DEVICES.json``), one row each."""
    out = []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        out.append({"model": path.stem.rsplit("_", 1)[0], "mesh": r["mesh"], "devices": r["devices"],
                    "batch": [r["batch_size"], r["seq_len"]], "dispatch": r["dispatch"],
                    "xla_bytes_per_device": r["xla"]["total"], "analytic_bytes_per_device": r["analytic"]["total"],
                    "ratio": r["xla_over_analytic"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-timing", action="store_true", help="FLOPs and plans only (no timed steps)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=str(HERE / "mesh_scaling.json"))
    args = p.parse_args(argv)
    flops = {m: step_flops(MODEL, _train_cfg(m), SEQ) for m in (None, "data=4")}
    doc = {"benchmark": "mesh_scaling", "model": "d256_e64_k8_fine", "dtype": "float32", "dispatch": "capacity",
           "date": time.strftime("%Y-%m-%d"), "cpu": machine_info(),
           "machine": {"platform": platform.platform(), "jax": jax.__version__, "backend": jax.default_backend()},
           "steps": None if args.no_timing else args.steps,
           "results": [] if args.no_timing else timing(args.steps),
           "flops_per_device": {str(m): f for m, f in flops.items()},
           "flops_per_device_ratio": {"data=4": flops["data=4"] / flops[None]},
           "plans": plans(), "before_token_local_dispatch": BEFORE}
    if args.no_timing:
        doc["results_pending"] = "timing not run: python bench/mesh_scaling.py on a quiet machine"
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for r in doc["results"]:
            print(f"{r['mesh']:>9}: {r['tokens_per_s']:,.0f} tokens/s ({r['ratio_vs_one_device']:.2f}x, "
                  f"best step {r['best_step_ms']:.0f} ms)")
        print(f"FLOPs per device, data=4 / 1 device: {doc['flops_per_device_ratio']['data=4']:.3f}")
        for r in doc["plans"]:
            print(f"plan {r['model']} on {r['mesh']}: XLA {r['xla_bytes_per_device'] / 1e9:.1f} GB per device, "
                  f"analytic {r['analytic_bytes_per_device'] / 1e9:.1f} GB ({r['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
