"""Tokens/s of the fine-grained d256 MoE train step on 1 device and on a 2-device data-parallel mesh.

    XLA_FLAGS is set here: python bench/mesh_scaling.py --json   (run under flock /tmp/moe-timing.lock)

The model is bench/moe_overhead.py's ``d256_e64_k8_fine`` (d_model 256, 2 layers, 64 experts of
width 128, top 8, capacity dispatch, float32, AdamW with clipping: the trainer's own jitted step
from :mod:`moe_scaling.train.step`) at the same global batch, 16 x 256 tokens. ``1 device`` is the
plain single-device jit; ``data=2`` is the same step compiled for a ``data=2`` mesh
(:mod:`moe_scaling.train.mesh`) over two XLA host devices, each device taking 8 rows. The two
alternate step by step (best of ``--steps`` each) so that load from other processes hits both
alike. On a CPU the two "devices" share the same cores and memory, so the mesh can at best
match the single device here; the number measures the cost of the partitioned program and its
collectives, not a speed-up. Written to ``bench/mesh_scaling.json``.
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
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import moe_scaling  # noqa: E402,F401  (malloc settings before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from moe_scaling.config import MeshShape, ModelConfig, TrainConfig  # noqa: E402
from moe_scaling.train.mesh import Placement  # noqa: E402
from moe_scaling.train.step import init_state, make_train_step  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = ModelConfig(vocab_size=256, n_layers=2, max_seq_len=256, d_model=256, n_heads=4, d_ff=1024,
                    n_experts=64, top_k=8, d_expert=128)
BATCH, SEQ = 16, 256


def _setup(mesh: str | None):
    cfg = TrainConfig(batch_size=BATCH, tokens=BATCH * SEQ * 100, dispatch="capacity")
    graphdef, state = init_state(MODEL, cfg, 100)
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
    step = make_train_step(graphdef, cfg, "capacity", placement)
    compiled = step.lower(state, x, y).compile()
    return {"compiled": compiled, "state": state, "x": x, "y": y}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=str(HERE / "mesh_scaling.json"))
    args = p.parse_args(argv)
    rows = {"1 device": _setup(None), "data=2": _setup("data=2")}
    times = {k: [] for k in rows}
    for _ in range(2):  # warm up
        for r in rows.values():
            r["state"], m = r["compiled"](r["state"], r["x"], r["y"])
            jax.block_until_ready(m)
    for _ in range(args.steps):
        for k, r in rows.items():
            t0 = time.perf_counter()
            r["state"], m = r["compiled"](r["state"], r["x"], r["y"])
            jax.block_until_ready(m)
            times[k].append(time.perf_counter() - t0)
    results = [{"mesh": k, "devices": 1 if k == "1 device" else 2, "global_batch": [BATCH, SEQ],
                "best_step_ms": 1e3 * min(t), "median_step_ms": 1e3 * float(np.median(t)),
                "tokens_per_s": BATCH * SEQ / min(t)} for k, t in times.items()]
    doc = {"benchmark": "mesh_scaling", "model": "d256_e64_k8_fine", "dtype": "float32", "steps": args.steps,
           "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
           "jax": jax.__version__, "backend": jax.default_backend()},
           "results": results,
           "data2_over_1device": results[1]["tokens_per_s"] / results[0]["tokens_per_s"]}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for r in results:
            print(f"{r['mesh']:>9}: {r['tokens_per_s']:,.0f} tokens/s (best step {r['best_step_ms']:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
