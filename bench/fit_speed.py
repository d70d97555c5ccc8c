"""Speed of the scaling-law fitting engine on the Chinchilla data (issue 5).

    python bench/fit_speed.py --json          # prints {"chinchilla_grid_s", "bootstrap_1000_s", ...}
    python bench/fit_speed.py --repeat 5 --baseline-starts 0

What is timed (the same code ``moe-fit`` runs, :mod:`moe_scaling.laws.fit`):

* ``chinchilla_grid_s``: the Hoffmann grid of 4,500 starts on the 240 Chinchilla points (5
  highest losses dropped, D = C / 6N, Huber delta 1e-3): every start screened in float32, the 8
  best distinct results polished in float64 (:func:`problem.fit_starts`), best kept;
* ``bootstrap_1000_s``: 1,000 bootstrap refits as ``moe-fit`` runs them (:func:`fit.bootstrap_refits`):
  each refit started from the same 16 starts that :func:`fit.fit_starts_and_cold` picks for
  ``moe-fit``'s defaults (a seeded subset of the grid plus 32 random draws, seed 0) and from the
  full-data optimum, as ``moe-fit`` starts them; float32 screen, the best result of each refit
  polished in float64. Their 95%
  percentile intervals are in ``bootstrap_95`` (compare Epoch's, ``../shared/data/chinchilla/README.md``).

Each is the best of ``--repeat`` runs in one process after a first call; the first call, which
includes XLA compilation of the batched optimiser, is reported as ``*_first_call_s``.
``scipy_numgrad_grid_estimate_s`` times a plain loop of scipy L-BFGS-B with numerical gradients
over ``--baseline-starts`` starts spread over the grid and scales it to 4,500 (what the issue
quotes as ~200 s). Results go to ``bench/fit_speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moe_scaling.laws.fit import bootstrap_refits, fit_starts_and_cold  # noqa: E402
from moe_scaling.laws.problem import fit_starts, make_problem  # noqa: E402
from moe_scaling.laws.tables import canonical_table  # noqa: E402
from moe_scaling.laws.registry import CHINCHILLA  # noqa: E402
from moe_scaling.runtime import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "chinchilla" / "svg_extracted_data.csv"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _scipy_baseline(problem, starts: np.ndarray) -> float:
    """Seconds for scipy L-BFGS-B with finite-difference gradients from each start (numpy objective)."""
    from scipy.optimize import minimize

    law, cols, logy, delta = problem.law, problem.cols, problem.logy, problem.delta
    names = law.internal_names

    def objective(q):
        r = logy - law.log_form(dict(zip(names, q)), cols, np)
        a = np.abs(r)
        return float(np.sum(np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))))

    t = time.perf_counter()
    with np.errstate(all="ignore"):
        for x0 in starts:
            minimize(objective, x0, method="L-BFGS-B")
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after the first call (best kept)")
    p.add_argument("--baseline-starts", type=int, default=45, help="scipy baseline starts (0: skip)")
    p.add_argument("--out", default=str(HERE / "fit_speed.json"), help="results file")
    args = p.parse_args(argv)

    table = canonical_table(pd.read_csv(DATA), {"params_active": "Model Size", "train_compute": "Training FLOP"})
    problem, data, _, _ = make_problem(CHINCHILLA, table, drop_highest_loss=5)
    grid = CHINCHILLA.start_grid()
    first_grid, (best, _, _) = _timed(lambda: fit_starts(problem, grid))
    grid_s = min(_timed(lambda: fit_starts(problem, grid))[0] for _ in range(args.repeat))
    _, cold = fit_starts_and_cold(problem, seed=0)      # what moe-fit's bootstrap starts from (its defaults):
    boot_starts = np.vstack([cold, best[:1]])           # its cold subset and the full-data optimum
    first_boot, draws = _timed(lambda: bootstrap_refits(problem, boot_starts, 1000, seed=0))
    boot_s = min(_timed(lambda: bootstrap_refits(problem, boot_starts, 1000, seed=0))[0] for _ in range(args.repeat))
    ok = np.isfinite(draws).all(axis=1)
    boot = CHINCHILLA.to_natural(draws[ok])
    fitted = dict(zip(CHINCHILLA.params, CHINCHILLA.to_natural(best[0]).round(6).tolist()))
    result = {
        "chinchilla_grid_s": round(grid_s, 3), "bootstrap_1000_s": round(boot_s, 3),
        "chinchilla_grid_first_call_s": round(first_grid, 3), "bootstrap_1000_first_call_s": round(first_boot, 3),
        "n_starts": int(grid.shape[0]), "n_points": data.n, "params": fitted,
        "bootstrap_starts": int(len(boot_starts)),
        "bootstrap_start": "moe-fit's: its seeded subset of 16 of its starts plus the full-data optimum",
        "bootstrap_failed": int((~ok).sum()),
        "bootstrap_95": {k: [round(float(np.percentile(boot[:, i], q)), 4) for q in (2.5, 97.5)]
                         for i, k in enumerate(CHINCHILLA.params)},
        "machine": machine_info(),
    }
    if args.baseline_starts:
        pick = grid[np.linspace(0, len(grid) - 1, args.baseline_starts).astype(int)]
        sec = _scipy_baseline(problem, pick)
        result["scipy_numgrad_grid_estimate_s"] = round(sec * len(grid) / len(pick), 1)
        result["scipy_numgrad_starts_timed"] = int(len(pick))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
