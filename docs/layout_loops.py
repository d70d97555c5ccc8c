"""The layout study's closed loops (issue 23, item 5): from the chosen law to three validation.json files.

    python docs/layout_loops.py [--fit FIT.json] [--out results/layout_validation] [--plan-only]

Run from the repository root. ``--fit`` defaults to the form ``docs/layout_forms.py --save fits/layout_forms`` chose (its
``chosen.txt``). For each training compute of ``COMPUTE`` (two inside the study's range, one 2.1x the
largest the law was fitted on: 1.41e13 FLOPs by the 3x-forward rule, the nominal 1.35e13 budget's largest
run) the loop is planned (``moe-fit --validate DIR --plan``, nothing trained) under each
memory budget of ``MEMORY``, and :func:`choose_budget` keeps, among the plans that pass the binding
targets (``moe_scaling.design.validate.verdict`` on a plan: memory or latency binds the optimum, it uses
at least 90% of the memory, no search-space bound), the one with the fewest optimizer steps over its
candidates and seeds: the cheapest loop to train (ties: the smaller budget). When no plan passes, the
same choice among the plans where memory binds at >= 90%, and the loop's verdict names the bound. The
rule was fixed before the law's final fit: no budget is chosen by what a loop measures.

Each loop then trains 3 seeds per candidate as the study trained its runs (``--like
sweeps/layout_isoflop.yaml``: its data, batch, schedule, router and learning rate by size) into
``OUT/c<C>/`` with two workers and writes ``OUT/c<C>/validation.json``; the plans stay in
``OUT/c<C>/plans/`` and the chosen budget in ``OUT/c<C>/budget.txt``. Rerunning resumes where a loop
stopped (a chosen budget is kept; the sweep skips finished runs).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from moe_scaling.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = ("1.5e12", "4.5e12", "3e13")
MEMORY = ("60KB", "80KB", "100KB", "125KB", "150KB", "200KB", "250KB", "300KB", "400KB", "500KB", "600KB",
          "800KB", "1MB", "1.5MB", "2MB")
FLAGS = ("--compute-rule", "3x-forward", "--context", "128", "--like", "sweeps/layout_isoflop.yaml")
"""The loops' options besides budget and compute (paths from the repository root, where this runs)."""


def plan(fit: Any, compute: str, memory: str, out: str | Path) -> dict[str, Any]:
    """The plan of one loop (``moe-fit --validate OUT --plan``'s ``validation`` object; writes OUT/grid.yaml)."""
    from moe_scaling.cli.fit import build_parser, run_validation

    args = build_parser().parse_args(["--budget-mem", memory, "--train-compute", compute, *FLAGS,
                                      "--validate", str(out), "--plan"])
    return run_validation(args, fit)["validation"]


def choose_budget(plans: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """``(memory, why)`` by the module docstring's rule over ``plans`` (memory budget -> plan, in the
    order of ``MEMORY``); ``memory`` is None when memory binds no plan at >= 90%."""
    passing = [m for m, p in plans.items() if p["verdict"]["passed"]]
    why = "the passing plan with the fewest steps"
    if not passing:
        passing = [m for m, p in plans.items() if "memory" in p["binding"] and p["memory_use"] >= 0.9]
        why = "no plan passes; among those where memory binds at >= 90%, the one with the fewest steps"
    if not passing:
        return None, "memory binds the optimum at >= 90% under no budget"
    best = min(passing, key=lambda m: plans[m]["steps"])       # min keeps the first (smaller) of equals
    return best, f"{why} ({plans[best]['steps']:,}); unmet: {'; '.join(plans[best]['verdict']['unmet']) or 'none'}"


def budgets(fit: Any, compute: str, out: Path | None = None) -> tuple[str | None, str, dict[str, dict]]:
    """Plan one loop under every budget of ``MEMORY`` (into ``out/plans/`` when given, else a temporary
    folder) and :func:`choose_budget` among them."""
    with tempfile.TemporaryDirectory() as tmp:
        plans = {m: {k: v for k, v in plan(fit, compute, m, tmp).items() if k != "grid"} for m in MEMORY}
    memory, why = choose_budget(plans)
    if out is not None:
        for m, p in plans.items():
            atomic_write_text(out / "plans" / f"{m}.json", json.dumps(p, indent=1) + "\n")
        if memory is not None:
            plan(fit, compute, memory, out)                         # OUT/grid.yaml: the chosen loop's
    return memory, why, plans


def main() -> None:
    from moe_scaling.cli.fit import main as moe_fit
    from moe_scaling.laws.fit import load_fit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", help="the law's fit JSON (default: the one fits/layout_forms/chosen.txt names)")
    ap.add_argument("--out", default="results/layout_validation", help="the loops' folder")
    ap.add_argument("--plan-only", action="store_true", help="choose the budgets, train nothing")
    args = ap.parse_args()
    fit_path = args.fit
    if fit_path is None:
        chosen = ROOT / "fits" / "layout_forms" / "chosen.txt"
        found = re.search(r"\(saved: (.+\.json)\)$", chosen.read_text().strip()) if chosen.exists() else None
        if found is None:
            raise SystemExit(f"layout_loops: no --fit and no saved choice in {chosen} (run docs/layout_forms.py "
                             "results/layout_isoflop --bootstrap 200 --save fits/layout_forms first)")
        fit_path = found.group(1)
    fit = load_fit(fit_path)
    for compute in COMPUTE:
        out = Path(args.out) / f"c{compute}"
        chosen_budget = out / "budget.txt"
        if not chosen_budget.exists():
            memory, why, plans = budgets(fit, compute, out)
            for m, p in plans.items():
                print(f"c{compute} memory {m}: memory use {p['memory_use']:.3f}, binding {p['binding']}, "
                      f"{p['steps']:,} steps; {'passes' if p['verdict']['passed'] else '; '.join(p['verdict']['unmet'])}")
            print(f"c{compute}: {memory}: {why}", flush=True)
            if memory is None:
                raise SystemExit(f"layout_loops: {why} at C = {compute}")
            atomic_write_text(chosen_budget, memory + "\n")
        memory = chosen_budget.read_text().strip()
        if args.plan_only:
            continue
        print(f"c{compute}: training the loop under {memory}", flush=True)
        code = moe_fit([fit_path, "--budget-mem", memory, "--train-compute", compute, *FLAGS, "--validate", str(out),
                 "--seeds", "3", "--workers", "2"])
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    main()
