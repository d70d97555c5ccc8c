"""Sweep overhead: wall time of a whole `moe-sweep run` over the sum of its train-step time.

    python bench/sweep_overhead.py                       # quickstart, cold and warm compilation cache
    python bench/sweep_overhead.py estimate sweeps/sparsity_granularity.yaml --probe-steps 30

`overhead` (default) runs the grid (default sweeps/quickstart.yaml) twice with one worker, each time
as the user would (`python -m moe_scaling.cli.sweep run GRID --out DIR`, a fresh process), timed from
process start to exit:

* cold: an empty sweep folder, so every train step, eval step and initialiser is compiled;
* warm: a fresh folder seeded with the cold run's JAX compilation cache (what a restarted sweep, or
  a grid whose runs share shapes, gets).

It reports wall / sum(step_time_s) (the target is <= 1.15) and where the rest goes: inside train()
(compile, eval, checkpoints, data, init) and outside it (interpreter start, imports, queue, tables).

`estimate` times a few runs of a grid briefly (`--probe-steps` steps each: per model size, the run
with the fewest and the one with the most experts and top-k), then predicts every run's time as its
steps x seconds per step plus a fixed cost (compile, init, evals), both interpolated linearly in
top_k between the two probes of its size. It writes the estimate into the JSON file; the grid file's
comment quotes it.

Results: bench/sweep_overhead.json (merged: each mode writes its own key) and bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("sweep_overhead.json")


def _sweep(grid: Path, out: Path, workers: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moe_scaling.cli.sweep", "run", str(grid), "--out",
                           str(out), "--workers", str(workers), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall


def _breakdown(out: Path, wall: float) -> dict:
    runs = pd.read_parquet(out / "runs.parquet")
    step = float(runs["step_time_s"].sum())
    train_wall = float(runs["wall_s"].sum())
    row = {"runs": len(runs), "wall_s": round(wall, 2), "step_time_s": round(step, 2),
           "overhead": round(wall / step, 3), "train_calls_s": round(train_wall, 2),
           "outside_train_s": round(wall - train_wall, 2),
           "inside_train_not_steps_s": round(train_wall - step, 2)}
    for col in ("compile_s", "eval_s", "ckpt_s"):
        if col in runs:
            row[col] = round(float(runs[col].sum()), 2)
    row["tokens_per_s_mean"] = round(float(runs["tokens_per_s"].mean()), 1)
    row["statuses"] = runs["status"].value_counts().to_dict()
    return row


def overhead(args) -> dict:
    grid = Path(args.grid).resolve()
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        cold_out, warm_out = Path(tmp) / "cold", Path(tmp) / "warm"
        cold = _breakdown(cold_out, _sweep(grid, cold_out, args.workers))
        print("cold:", json.dumps(cold), flush=True)
        warm_out.mkdir()
        shutil.copytree(cold_out / "jax_cache", warm_out / "jax_cache")
        warm = _breakdown(warm_out, _sweep(grid, warm_out, args.workers))
        print("warm:", json.dumps(warm), flush=True)
    return {"grid": str(grid.relative_to(REPO)), "workers": args.workers, "cold": cold, "warm": warm}


def estimate(args) -> dict:
    from moe_scaling.sweep.grid import expand_grid, load_grid, resolve_corpus
    from moe_scaling.runtime import enable_compilation_cache
    from moe_scaling.train.loop import train

    spec = load_grid(args.grid)
    runs = expand_grid(spec)
    by_size: dict[tuple, list] = {}
    for r in runs:
        by_size.setdefault((r.model.d_model, r.model.n_layers), []).append(r)
    probes = []
    for size, group in sorted(by_size.items()):
        group = sorted(group, key=lambda r: (r.model.n_experts, r.model.top_k, r.model.n_shared))
        probes += [group[0], group[-1]] if len(group) > 1 else group[:1]
    measured = []
    with tempfile.TemporaryDirectory(prefix="sweep-estimate-") as tmp:
        enable_compilation_cache(tmp)
        for r in probes:
            seq, batch = r.data.seq_len, r.train.batch_size
            tcfg = dataclasses.replace(r.train, tokens=args.probe_steps * seq * batch,
                                       eval_every=args.probe_steps, ckpt_every=10**9)
            data = dataclasses.replace(r.data, corpus=resolve_corpus(r.data.corpus, spec.path.parent))
            res = train(r.model, tcfg, data, progress=False)
            per_step = res.step_time_s / res.steps
            evals = r.train.steps(seq) // r.train.eval_every + 1
            fixed = (res.wall_s - res.step_time_s) + evals * res.metrics.get("eval_s", 0.0) / 2
            measured.append({"run_id": r.run_id, "d_model": r.model.d_model, "n_layers": r.model.n_layers,
                             "n_experts": r.model.n_experts, "top_k": r.model.top_k,
                             "s_per_step": round(per_step, 4), "fixed_s": round(fixed, 2),
                             "tokens_per_s": round(res.tokens_per_s, 1)})
            print(json.dumps(measured[-1]), flush=True)
    total = 0.0
    for r in runs:
        lo, hi = [m for m in measured if (m["d_model"], m["n_layers"]) == (r.model.d_model, r.model.n_layers)]
        # per size, linear in top_k between the two probes (routed work grows with top_k)
        f = min(max((r.model.top_k - lo["top_k"]) / max(hi["top_k"] - lo["top_k"], 1), 0.0), 1.0)
        per_step = lo["s_per_step"] + f * (hi["s_per_step"] - lo["s_per_step"])
        fixed = lo["fixed_s"] + f * (hi["fixed_s"] - lo["fixed_s"])
        total += r.train.steps(r.data.seq_len) * per_step + fixed
    return {"grid": str(Path(args.grid).resolve().relative_to(REPO)), "runs": len(runs),
            "probe_steps": args.probe_steps, "probes": measured, "estimated_total_s": round(total),
            "estimated_total_h": round(total / 3600, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    o = sub.add_parser("overhead")
    o.add_argument("--grid", default=str(REPO / "sweeps" / "quickstart.yaml"))
    o.add_argument("--workers", type=int, default=1)
    e = sub.add_parser("estimate")
    e.add_argument("grid")
    e.add_argument("--probe-steps", type=int, default=30)
    args = p.parse_args(sys.argv[1:] or ["overhead"])
    result = overhead(args) if args.mode == "overhead" else estimate(args)
    from moe_scaling.sweep.results import code_version
    from moe_scaling.runtime import machine_info

    result["machine"] = machine_info() | {"code_version": code_version()}
    key = args.mode if args.mode == "estimate" else f"overhead_workers{args.workers}"
    if args.mode == "estimate":
        key = f"estimate_{Path(args.grid).stem}"
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    doc[key] = result
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
