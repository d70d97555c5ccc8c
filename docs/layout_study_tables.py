"""Regenerates results/layout_isoflop/README.md (issue 23's study) from its runs table.

    python docs/layout_study_tables.py results/layout_isoflop [--write]

Prints (or with ``--write`` writes atomically, with its two figures in ``figures/``) the README: how
the study was run, its state (runs completed, summed wall time), the seed-to-seed noise floor by layout
family and optimizer-step regime (:func:`moe_scaling.laws.noise.pooled_seed_sd` on each family's runs)
and, per budget, the seed-0 final eval loss of every layout at every size trained so far with its
isoFLOP minimum (:func:`moe_scaling.plots.isoflop.isoflop_minima`). Every number comes from ``runs.parquet``; the
prose around them (grid, steps, epochs) is the grid's and changes only when the grid does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from moe_scaling.files import atomic_write_text
from moe_scaling.laws.noise import STEP_REGIMES, noise_family, pooled_seed_sd
from moe_scaling.plots.isoflop import compute_budgets, isoflop_minima
from moe_scaling.plots.runs import completed, run_label

TOTAL, SEED0 = 360, 216
"""Runs in sweeps/layout_isoflop.yaml, and of them with seed 0 (every budget once)."""

HEAD = """\
# results/layout_isoflop: the layout study (issue 23){state}

`sweeps/layout_isoflop.yaml` (360 runs: 3 budgets x 6 sizes x 12 layouts at equal active compute, 3 seeds on
the smallest budget; learning rate per size from `results/layout_lr/`). Trained on the 2-core AMD EPYC with
AVX-512 (avx512f/bw/vl/vnni/bf16), JAX as pinned by pyproject, CPU, two workers (each pinned to its own core
since 2026-12-06 08:30), beside other work (niced; paused for timings). Commands, each skipping what is done
(a worker claims only the runs its `--only` selects):

```bash
moe-sweep run sweeps/layout_isoflop.yaml --out results/layout_isoflop --only "seed == 0" --workers 2    # every budget, one seed
moe-sweep run sweeps/layout_isoflop.yaml --out results/layout_isoflop --workers 2                      # then the smallest budget's seeds 1-2
```

State at this commit: {done} of 360 runs completed ({seed0} of the 216 seed-0 runs; {repeats} repeats),
summed run wall time {hours:.2f} h. The smallest size of each budget was added after the
smallest budget's seed-0 runs put every E16 layout's minimum at d24, then its smallest size: d16 at 1.5e12,
d24 at 4.5e12 and d32 at 1.35e13 (a 3x budget moves the compute-optimal size ~sqrt(3)x). The committed files
are the tables (`runs.parquet`, `curves.parquet`), the grid copy and the manifest; checkpoints and the queue
stay on the machine that trains. This file is written by `python docs/layout_study_tables.py
results/layout_isoflop --write`.

Final eval loss (nats per byte, Gutenberg held-out split), seed 0, by layout and size
(`moe_scaling.plots.isoflop.isoflop_minima`; bold: the lowest; "interior" when that layout's own sizes
bracket it, with the vertex of the parabola in ln(active parameters) through the lowest mean and its
neighbours; only the sizes trained{sofar} are columns). Steps per run: 1.5e12: d16 15,382, d24 8,257,
d32 5,183, d48 2,606, d64 1,569, d96 513; 4.5e12: 3x those of the same size (d128 677); 1.35e13: 9x
(d160 1,325). Epochs (training tokens over the 23.37M-token training split; windows are drawn at
random): at most 0.67 at 1.5e12 (d16), 1.09 at 4.5e12 (d24), 2.04 at 1.35e13 (d32). One seed: a
difference is a finding only beside the noise floor, which the smallest budget's seeds 1-2 give ({configs}
configurations with repeats, pooled sd {floor}; the committed isoFLOP study's floor: 0.035 under
1,000 steps, 0.013 at 1,000-3,000, 0.007 above). The law these data chose, by the rule fixed before
the last runs: `fits/layout_forms/verdict.txt` (`docs/layout_forms.py`); its closed loops:
`results/layout_validation/`.

Figures (written with this file from the same table): `figures/isoflop.png`, eval loss against size per
budget and layout (mean and sd over the seeds a point has), and `figures/layout_minima.png`, each
layout's isoFLOP minimum minus dense's per budget beside +-2 sqrt(2) pooled noise floors (two minima of
one run each).

Seed-to-seed noise{sofar} (`moe_scaling.laws.noise.pooled_seed_sd`: the pooled sd over configurations
with repeats, each contributing its n - 1 degrees of freedom; by layout family and by optimizer-step
regime, dof in brackets). MoE runs scatter several times more than dense ones at equal compute (routing
amplifies a different data order and initialisation), so a layout comparison is judged against the
pooled floor of all runs, not dense's:
"""


def _regime(lo: float, hi: float) -> str:
    return f">= {lo:,.0f} steps" if np.isinf(hi) else f"{lo:,.0f}-{hi - 1:,.0f} steps"


def _family_label(name: str) -> str:
    """``moe x16 + shared`` -> ``E16 + shared`` (the layouts' own labels)."""
    return name if name == "dense" else "E" + name[len("moe x"):]


def noise_table(done: pd.DataFrame) -> tuple[str, dict]:
    """The markdown noise table (all runs, then each family) and the all-runs pooled result."""
    t = done.assign(loss=done["eval_loss"])
    every = pooled_seed_sd(t)
    fam = pd.Series([noise_family(float(e), int(s) > 0) for e, s in zip(t["expansion"], t["n_shared"])],
                    index=t.index)
    order = ["dense"] + [f["family"] for f in every["noise_floor_by_family"] or []
                         if f["family"] not in ("dense", "moe")]
    regimes = list(zip(STEP_REGIMES[:-1], STEP_REGIMES[1:]))
    lines = ["| runs | configurations with repeats | dof | pooled sd | "
             + " | ".join(_regime(lo, hi) for lo, hi in regimes) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(regimes)]
    for label, part in [("all", t)] + [(_family_label(f), t[fam == f]) for f in order]:
        p = pooled_seed_sd(part)
        if p["noise_floor"] is None:
            continue
        by = {s["steps"][0]: s for s in p["noise_floor_by_steps"] or []}
        cells = [f"{by[lo]['noise_floor']:.4f} ({by[lo]['dof']})" if lo in by else "-" for lo, _ in regimes]
        lines.append(f"| {label} | {p['noise_floor_configs']} | {p['noise_floor_dof']} | "
                     f"{p['noise_floor']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", every


def budget_tables(done: pd.DataFrame) -> str:
    """One markdown table per budget: seed-0 loss by layout (rows) and size (columns), and the minimum."""
    seed0 = done[done["seed"] == 0]
    minima = isoflop_minima(seed0)
    budgets = compute_budgets(seed0)
    labels = pd.Series([run_label(r) for _, r in seed0.iterrows()], index=seed0.index)
    out = []
    for b in sorted(minima["budget"].unique()):
        rows = seed0[budgets == b]
        sizes = sorted({(int(d), int(n)) for d, n in zip(rows["d_model"], rows["n_layers"])})
        names = [f"d{d} L{n}" for d, n in sizes]
        out.append(f"Budget C = {b:.3g} FLOPs (seed 0):\n")
        out.append("| layout | " + " | ".join(names) + " | minimum |")
        out.append("|---|" + "---:|" * len(names) + "---|")
        m = minima[minima["budget"] == b].set_index("arch")
        archs = sorted(m.index, key=lambda a: (a != "dense", a))
        for a in archs:
            r = m.loc[a]
            loss = dict(zip(r["sizes"], r["losses"]))
            cells = [("**{:.4f}**" if s == r["best_size"] else "{:.4f}").format(loss[s]) if s in loss else "-"
                     for s in names]
            missing = len(names) - len(loss)
            where = (f"interior; vertex {r['optimal_params'] / 1e3:.1f}k active" if r["interior"] else "edge")
            if missing:
                where += f", {missing} size(s) not trained yet"
            out.append(f"| {a} | " + " | ".join(cells) + f" | {r['best_size']} ({where}) |")
        out.append("")
    return "\n".join(out)


def readme(sweep: Path) -> str:
    """The README text of the study at ``sweep`` (its ``runs.parquet``)."""
    runs = pd.read_parquet(sweep / "runs.parquet")
    done = completed(runs, "eval_loss")
    seed0 = int((done["seed"] == 0).sum())
    table, every = noise_table(done)
    state = "" if len(done) >= TOTAL else ", in progress"
    head = HEAD.format(state=state, sofar=" so far" if state else "", done=len(done), seed0=seed0,
                       repeats=len(done) - seed0, hours=float(done["wall_s"].sum()) / 3600.0, configs=every["noise_floor_configs"],
                       floor="-" if every["noise_floor"] is None else f"{every['noise_floor']:.4f}")
    return head + "\n" + table + "\n" + budget_tables(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--write", action="store_true", help="replace SWEEP/README.md (atomically)")
    args = ap.parse_args()
    text = readme(args.sweep)
    if not args.write:
        print(text, end="")
        return
    write_figures(args.sweep)
    atomic_write_text(args.sweep / "README.md", text)


def write_figures(sweep: Path) -> None:
    """``sweep/figures/isoflop.png`` and ``layout_minima.png`` (as ``moe-sweep plot`` draws them)."""
    from moe_scaling.plots.isoflop import isoflop_figure, layout_minima_figure
    from moe_scaling.plots.style import save_figure

    runs = pd.read_parquet(sweep / "runs.parquet")
    for name, fig in (("isoflop", isoflop_figure(runs)), ("layout_minima", layout_minima_figure(runs))):
        if fig is not None:
            save_figure(fig, sweep / "figures" / name, formats=("png",))


if __name__ == "__main__":
    main()
