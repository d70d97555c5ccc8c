"""Sweep workers pinned to their own cores against sharing every core (``moe-sweep run --workers N``).

    python bench/worker_pinning.py --json           # writes bench/worker_pinning.json (~2 min on 2 cores)

Two worker processes train at once, as ``moe-sweep run --workers 2`` does on a 2-core machine, each a
study-sized model (sweeps/layout_isoflop.yaml's smallest budget: d24 x 2 layers, 64 experts of width 6,
top-4, and d32 x 2 layers, 16 experts of width 128, top-1; batch 8 x 128, capacity dispatch), each
timing ``--steps`` compiled train steps after a warm-up. Two conditions, alternating for
``--rounds`` rounds: ``shared`` (both processes may use every core: XLA:CPU's thread pool spreads
each over all of them) and ``pinned`` (each process restricted to its own slice of the cores,
:func:`moe_scaling.sweep.devices.cpu_share`, what each spawned sweep worker now does to itself).
``speedup`` = shared step time / pinned step time per model, median over rounds. Run it with nothing
else on the machine (it takes the timing lock; pause running sweeps).

Results: bench/worker_pinning.json and bench/README.md ("sweep workers").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = {"d24-E64-top4": (24, 64, 4, 6), "d32-E16-top1": (32, 16, 1, 128)}

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from moe_scaling.config import ModelConfig, TrainConfig
from moe_scaling.train.step import init_state, make_train_step
d, e, k, de, steps = (int(v) for v in sys.argv[1:6])
mc = ModelConfig(vocab_size=256, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=d // 4, d_ff=4 * d,
                 n_experts=e, top_k=k, d_expert=de, router="softmax", norm_topk=False)
tc = TrainConfig(tokens=8 * 128 * 10_000, batch_size=8, lr=3e-3, dispatch="capacity", capacity_factor=1.25)
graphdef, state = init_state(mc, tc, 10_000)
x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 128)), jnp.int32)
step = make_train_step(graphdef, tc, "capacity").lower(state, x, x).compile()
for _ in range(20):
    state, m = step(state, x, x); jax.device_get(m)
t = time.perf_counter()
for _ in range(steps):
    state, m = step(state, x, x); jax.device_get(m)
print(json.dumps({"step_ms": 1e3 * (time.perf_counter() - t) / steps}))
"""


def run_pair(steps: int, pinned: bool) -> dict[str, float]:
    from moe_scaling.sweep.devices import cpu_share

    cpus = sorted(os.sched_getaffinity(0))
    procs = {}
    for i, (name, (d, e, k, de)) in enumerate(MODELS.items()):
        cmd = [sys.executable, "-c", CHILD, *map(str, (d, e, k, de, steps))]
        if pinned:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpu_share(i, len(MODELS), cpus))))] + cmd
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                       env=os.environ | {"JAX_PLATFORMS": "cpu"})
    return {name: json.loads(p.communicate()[0].strip().splitlines()[-1])["step_ms"] for name, p in procs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="write bench/worker_pinning.json")
    args = ap.parse_args()
    from moe_scaling.runtime import machine_info, timing_lock

    machine = machine_info()
    rounds = []
    with timing_lock():
        for r in range(args.rounds):
            row = {"shared": run_pair(args.steps, pinned=False), "pinned": run_pair(args.steps, pinned=True)}
            rounds.append(row)
            print(r, json.dumps(row), flush=True)
    out = {"machine": machine, "steps": args.steps, "rounds": rounds,
           "speedup": {m: statistics.median(r["shared"][m] / r["pinned"][m] for r in rounds) for m in MODELS},
           "step_ms": {c: {m: statistics.median(r[c][m] for r in rounds) for m in MODELS} for c in ("shared", "pinned")}}
    print(json.dumps({k: out[k] for k in ("speedup", "step_ms")}, indent=1))
    if args.json:
        from moe_scaling.files import write_json
        write_json(Path(__file__).with_name("worker_pinning.json"), out)


if __name__ == "__main__":
    main()
