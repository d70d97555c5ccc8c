"""Seed batching: N seeds of one model trained together (train_group) against one by one (train).

    python bench/seed_batching.py --json              # 3 and 8 seeds, 200 steps each (the default)
    python bench/seed_batching.py --steps 200 --seeds 3 --only d48 --json

Models: the smallest and the largest size of sweeps/sparsity_granularity.yaml (d_model 48 x 2
layers, d_model 96 x 3 layers), each as its dense run (E = 1) and as its largest MoE run (E = 8 at
G = 8: 64 experts of width d_ff / 8, top-8), on the grid's corpus, batch 16 x 128, float32,
capacity dispatch; the grid's configs with the token budget cut to ``--steps`` steps, a log row
every step and one checkpoint at the end.

For each model and N, in one process (steady state of a sweep worker: every program is compiled by
an untimed warm-up call first, so neither side pays compilation):

* ``sequential_s``: wall time of N ``train()`` calls, one per seed, each with its own checkpoint
  folder (what ``moe-sweep run --no-batch`` does per run);
* ``batched_s``: wall time of one ``train_group()`` call over the N seeds (what ``moe-sweep run``
  does);
* ``speedup``: the median over ``--rounds`` rounds, each timing both sides one after the other, of
  sequential_s / batched_s (``sequential_s`` and ``batched_s`` are the medians of the rounds);
  ``step_speedup`` the same for the time inside the train steps alone; ``cpu_speedup`` for the
  process's CPU time (user + system), which a machine busy with other work inflates far less;
* ``max_abs_loss_diff``: the largest |train loss of a member - train loss of its solo run| over
  the first 10 steps and every member;
* ``final_eval_loss_diff``: the largest |final eval loss of a member - its solo run's|, beside
  ``seed_spread``, the range of the solo runs' final eval losses.

Results: bench/seed_batching.json (with --json also printed) and bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("seed_batching.json")
GRID = REPO / "sweeps" / "sparsity_granularity.yaml"


def _models(steps: int):
    """(name, ModelConfig, TrainConfig, DataConfig) of the four benchmarked runs of the grid."""
    from moe_scaling.sweep.grid import expand_grid, load_grid, resolve_corpus

    runs = expand_grid(load_grid(GRID))
    sizes = sorted({(r.model.d_model, r.model.n_layers) for r in runs})
    picked = []
    for d, layers in (sizes[0], sizes[-1]):
        size = [r for r in runs if (r.model.d_model, r.model.n_layers) == (d, layers) and r.model.n_shared == 0]
        dense = next(r for r in size if not r.model.is_moe)
        moe = max(size, key=lambda r: (r.model.n_experts, r.model.top_k))
        for kind, r in (("dense", dense), (f"e{moe.model.n_experts}_k{moe.model.top_k}", moe)):
            per_step = r.train.batch_size * r.data.seq_len
            train = dataclasses.replace(r.train, tokens=steps * per_step, log_every=1, eval_every=steps,
                                        ckpt_every=steps)
            data = dataclasses.replace(r.data, corpus=resolve_corpus(r.data.corpus, GRID.parent))
            picked.append((f"d{d}_l{layers}_{kind}", r.model, train, data))
    return picked


def _losses(result, steps: int = 10) -> list[float]:
    return [row["train_loss"] for row in result.curve if 1 <= row["step"] <= steps]


def measure(name, model, train_cfg, data, n: int, tmp: Path, rounds: int) -> dict:
    from moe_scaling.train.group import train_group
    from moe_scaling.train.loop import train

    cfgs = [dataclasses.replace(train_cfg, seed=s) for s in range(n)]
    train(model, cfgs[0], data, progress=False)                       # warm-up: compile
    train_group(model, cfgs, data)
    seq_s, bat_s, seq_cpu, bat_cpu, seq_step, bat_step = [], [], [], [], [], []
    for k in range(rounds):         # the two sides alternate, so a slow spell of the host hits both
        folder = tmp / f"{name}_{n}_r{k}"
        t0, c0 = time.perf_counter(), time.process_time()
        solo = [train(model, c, data, ckpt_dir=folder / f"solo{i}", progress=False) for i, c in enumerate(cfgs)]
        seq_s.append(time.perf_counter() - t0), seq_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        group = train_group(model, cfgs, data, ckpt_dirs=[folder / f"group{i}" for i in range(n)])
        bat_s.append(time.perf_counter() - t0), bat_cpu.append(time.process_time() - c0)
        seq_step.append(sum(r.step_time_s for r in solo)), bat_step.append(sum(r.step_time_s for r in group))
    diff = max(abs(a - b) for s, g in zip(solo, group) for a, b in zip(_losses(s), _losses(g)))
    finals = [r.final_eval_loss for r in solo]
    final_diff = max(abs(s.final_eval_loss - g.final_eval_loss) for s, g in zip(solo, group))
    med = statistics.median
    row = {"name": name, "models": n, "steps": solo[0].steps, "rounds": rounds,
           "sequential_s": round(med(seq_s), 2), "batched_s": round(med(bat_s), 2),
           "speedup": round(med([a / b for a, b in zip(seq_s, bat_s)]), 2),
           "speedup_by_round": [round(a / b, 2) for a, b in zip(seq_s, bat_s)],
           "max_abs_loss_diff": float(f"{diff:.3g}"),
           "final_eval_loss_diff": float(f"{final_diff:.3g}"),
           "seed_spread": float(f"{max(finals) - min(finals):.3g}"),
           "sequential_cpu_s": round(med(seq_cpu), 2), "batched_cpu_s": round(med(bat_cpu), 2),
           "cpu_speedup": round(med([a / b for a, b in zip(seq_cpu, bat_cpu)]), 2),
           "sequential_step_s": round(med(seq_step), 2), "batched_step_s": round(med(bat_step), 2),
           "step_speedup": round(med([a / b for a, b in zip(seq_step, bat_step)]), 2)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="train steps per run (default 200; the study's runs have 977-1,953)")
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 8], help="group sizes (default 3 8)")
    p.add_argument("--only", help="benchmark only the models whose name contains this")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating sequential/batched rounds; medians reported (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import moe_scaling  # noqa: F401 - the allocator setting, before JAX starts
    from moe_scaling.sweep.results import code_version
    from moe_scaling.runtime import machine_info

    rows = []
    with tempfile.TemporaryDirectory(prefix="seed-batching-") as tmp:
        for name, model, train_cfg, data in _models(args.steps):
            if args.only and args.only not in name:
                continue
            for n in args.seeds:
                rows.append(measure(name, model, train_cfg, data, n, Path(tmp), args.rounds))
    doc = {"results": rows, "steps": args.steps, "grid": str(GRID.relative_to(REPO)),
           "machine": machine_info() | {"code_version": code_version()}}
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<22} x{r['models']}: sequential {r['sequential_s']:7.2f} s  batched "
                  f"{r['batched_s']:7.2f} s  speedup {r['speedup']:.2f}  max |loss diff| {r['max_abs_loss_diff']:.1e}")


if __name__ == "__main__":
    main()
