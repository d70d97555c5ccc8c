"""Seed-to-seed spread of the trained losses that tests compare: the source of their tolerances.

    python bench/seed_spread.py            # both cases, ~2 minutes on 2 cores; writes bench/seed_spread.json

A trained loss compared across two code paths that round differently (batched against solo runs,
bfloat16 against float32, one CPU's kernels against another's) cannot be held to a tolerance read off
one machine's output: after enough steps a last-bit difference (an MoE routing flip, a reassociated
sum) moves the run as far as a change of seed does. Its tolerance comes from the seed spread, measured
here with many seeds on the tests' own configurations (never a 3-seed range with 2 degrees of freedom):

* ``sweep_tiny_300_steps``: the tiny sweep of ``tests/test_seed_batching.py`` (``tests/test_sweep.py``'s
  TINY grid, 2 experts, 300 steps), 16 seeds through ``moe-sweep run``: the sd of the final eval loss.
* ``precision_8_steps``: ``tests/test_precision.py``'s model, 8 steps in float32, 8 seeds: the sd of
  the final eval loss and of each step's train loss.

The JSON records the machine (CPU, ISA) beside the figures; the sd is a property of the training,
the same in distribution on any CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
RESULTS = REPO / "bench" / "seed_spread.json"


def sweep_tiny(seeds: int, tmp: Path) -> dict:
    import pandas as pd
    from test_sweep import write_grid

    grid = write_grid(tmp, "seeds", grid={"n_experts": [2]}, seeds=list(range(seeds)))
    subprocess.run([sys.executable, "-m", "moe_scaling.cli.sweep", "run", str(grid), "--out", str(tmp / "out"),
                    "--quiet"], check=True, cwd=REPO)
    loss = pd.read_parquet(tmp / "out" / "runs.parquet")["eval_loss"].to_numpy()
    return {"seeds": int(loss.size), "final_eval_sd": float(loss.std(ddof=1)), "final_eval_range": float(np.ptp(loss))}


def precision(seeds: int, tmp: Path) -> dict:
    from moe_scaling.config import TrainConfig
    from moe_scaling.train.loop import train
    from test_precision import DATA, MODEL

    train_losses, evals = [], []
    for seed in range(seeds):
        cfg = TrainConfig(tokens=8 * 8 * 32, batch_size=8, lr=3e-3, warmup=1, log_every=1, eval_every=8,
                          eval_batches=1, dtype="float32", seed=seed)
        r = train(MODEL, cfg, DATA, progress=False, ckpt_dir=tmp / f"p{seed}")
        train_losses.append([row["train_loss"] for row in r.curve[1:]])
        evals.append(r.final_eval_loss)
    return {"seeds": seeds, "final_eval_sd": float(np.std(evals, ddof=1)),
            "train_sd_per_step": [round(float(v), 4) for v in np.std(train_losses, axis=0, ddof=1)]}


def main() -> int:
    from moe_scaling.runtime import machine_info

    with tempfile.TemporaryDirectory(prefix="seed-spread-") as tmp:
        doc = {"sweep_tiny_300_steps": sweep_tiny(16, Path(tmp) / "sweep"),
               "precision_8_steps": precision(8, Path(tmp)),
               "machine": machine_info()}
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
