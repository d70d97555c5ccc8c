"""The layout study's closed loops (issue 23, item 5): from the chosen law to three validation.json files.

    python docs/layout_loops.py [--fit FIT.json] [--out results/layout_validation] [--plan-only]

Run from the repository root. ``--fit`` defaults to the form that ``docs/layout_forms.py --save
fits/layout_forms`` chose (its ``chosen.txt``). For each training compute of :func:`computes` (two inside the
study's range, one at twice the largest the law was fitted on, rounded up: on the 360 runs 1.58e13 FLOPs
by the 3x-forward rule, the nominal 1.35e13 budget's largest run, so 3.2e13) the loop is planned
(``moe-fit --validate DIR --plan``, nothing trained) under each memory budget of ``MEMORY``, and
:func:`choose_budget` keeps, among the plans that pass the binding targets
(``moe_scaling.design.validate.verdict`` on a plan: memory or latency binds the optimum, it uses at
least 90% of the memory, no search-space bound), the one with the fewest optimizer steps over its
candidates and seeds: the cheapest loop to train (ties: the smaller budget). When no plan passes, the
same choice among the plans where memory binds at >= 90%, and the loop's verdict names the bound. The
rule was fixed before the law's final fit: no budget is chosen by what a loop measures.

Each loop then trains 3 seeds per candidate as the study trained its runs (``--like
sweeps/layout_isoflop.yaml``: its data, batch, schedule, router and learning rate by size) into
``OUT/c<C>/`` with two workers and writes ``OUT/c<C>/validation.json``; the plans stay in
``OUT/c<C>/plans/`` and the chosen budget in ``OUT/c<C>/budget.txt``. Rerunning resumes where a loop
stopped (a chosen budget is kept; the sweep skips finished runs). After each loop, and with
``--report`` alone, ``OUT/README.md`` tabulates the loops so far (:func:`report`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from moe_scaling.design.validate import model_shape
from moe_scaling.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
INSIDE = ("1.5e12", "4.5e12")
"""The two loops inside the study's range of training compute: its smallest and middle budgets."""
RULE = "3x-forward"
"""The loops' compute rule (training FLOPs = 3 x forward FLOPs x tokens), as the study's budgets."""
MEMORY = ("60KB", "80KB", "100KB", "125KB", "150KB", "200KB", "250KB", "300KB", "400KB", "500KB", "600KB",
          "800KB", "1MB", "1.5MB", "2MB")
FLAGS = ("--compute-rule", RULE, "--context", "128", "--like", "sweeps/layout_isoflop.yaml")
"""The loops' options besides budget and compute (paths from the repository root, where this runs)."""


def beyond(largest: float) -> str:
    """The third loop's training compute: twice ``largest`` (the largest training compute the law was
    fitted on, by :data:`RULE`) rounded up to two significant digits, so that its extrapolation is at
    least 2 (issue 23, item 5): ``beyond(1.5848e13) == "3.2e13"``, ``beyond(1.5e13) == "3e13"``."""
    target = 2.0 * largest
    e = math.floor(math.log10(target)) - 1
    q = math.ceil(round(target / 10.0 ** e, 9))                 # round: 3e13 / 1e12 is 30.000000000000004
    if q >= 100:
        q, e = q // 10, e + 1
    return f"{q / 10:g}e{e + 1}"


def computes(fit: Any) -> tuple[str, ...]:
    """The loops' training computes: :data:`INSIDE` and :func:`beyond` the fit's largest."""
    return (*INSIDE, beyond(fit.metrics["max_train_compute"][RULE]))


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


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report(root: str | Path) -> str:
    """The loops' README: per training compute, its memory budget and each candidate's prediction
    (90% interval for the mean of its seeds) beside its measured mean and sd, then the verdict
    numbers and the targets the loop misses; a loop not trained yet shows its plan."""
    root = Path(root)
    out = ["# results/layout_validation: the layout study's closed loops (issue 23, item 5)", "",
           "Written by `python docs/layout_loops.py --report` from each loop's `validation.json` (or, before",
           "it trains, its chosen plan); how the loops and their budgets were chosen: the docstring of",
           "`docs/layout_loops.py`. Loss: final eval loss, nats per byte; sd over the seeds (ddof 1).", "",
           "| C | memory | candidate | model | tokens | predicted [90% interval] | measured |",
           "|---|---|---|---|---:|---|---|"]
    notes = []
    for d in sorted(root.glob("c*/budget.txt"), key=lambda p: float(p.parent.name[1:])):
        d = d.parent
        compute = d.name[1:]
        memory = (d / "budget.txt").read_text().strip()
        done = d / "validation.json"
        v = json.loads((done if done.exists() else d / "plans" / f"{memory}.json").read_text())
        for c in v["candidates"]:
            iv = c.get("interval")
            pred = f"{c['predicted_loss']:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")
            meas = ("not trained yet" if not c.get("measured") else
                    f"{c['measured_mean']:.4f} +- {_num(c['measured_std'], '.4f')} ({len(c['measured'])} seeds)")
            name = c["name"] + (f" (= {', '.join(c['also'])})" if c.get("also") else "")
            out.append(f"| {compute} | {memory} | {name} | {model_shape(c['model'])} | {c['tokens'] / 1e6:.1f}M | "
                       f"{pred} | {meas} |")
        unmet = "; ".join(v["verdict"]["unmet"]) or "none"
        if done.exists():
            notes.append(f"- C = {compute} under {memory}: noise floor {_num(v['noise_floor'], '.4f')} (pooled over "
                         f"the candidates' seeds), optimum_gap {_num(v['optimum_gap'], '.4f')}, concordance "
                         f"{_num(v['concordance'], '.2f')}, within_interval {_num(v['within_interval'], '.2f')}, "
                         f"Spearman {_num(v['spearman'], '.2f')}, extrapolation {_num(v['extrapolation'], '.2f')}, "
                         f"binding {', '.join(v['binding'])}, memory use {v['memory_use']:.0%}; unmet targets: {unmet}.")
        else:
            notes.append(f"- C = {compute} under {memory}: planned, not trained ({v['steps']:,} optimizer steps over "
                         f"{v['seeds']} seeds); extrapolation {_num(v['extrapolation'], '.2f')}, binding "
                         f"{', '.join(v['binding'])}, memory use {v['memory_use']:.0%}; unmet binding targets: {unmet}.")
    return "\n".join(out + [""] + notes) + "\n"


def main() -> None:
    from moe_scaling.cli.fit import main as moe_fit
    from moe_scaling.laws.fit import load_fit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", help="the law's fit JSON (default: the one fits/layout_forms/chosen.txt names)")
    ap.add_argument("--out", default="results/layout_validation", help="the loops' folder")
    ap.add_argument("--plan-only", action="store_true", help="choose the budgets, train nothing")
    ap.add_argument("--report", action="store_true", help="only (re)write OUT/README.md from the loops so far")
    args = ap.parse_args()
    if args.report:
        atomic_write_text(Path(args.out) / "README.md", report(args.out))
        return
    fit_path = args.fit
    if fit_path is None:
        chosen = ROOT / "fits" / "layout_forms" / "chosen.txt"
        found = re.search(r"\(saved: (.+\.json)\)$", chosen.read_text().strip()) if chosen.exists() else None
        if found is None:
            raise SystemExit(f"layout_loops: no --fit and no saved choice in {chosen} (run docs/layout_forms.py "
                             "results/layout_isoflop --bootstrap 200 --save fits/layout_forms first)")
        fit_path = found.group(1)
    fit = load_fit(fit_path)
    for compute in computes(fit):
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
        code = moe_fit([fit_path, "--budget-mem", memory, "--train-compute", compute, *FLAGS,
                        "--validate", str(out), "--seeds", "3", "--workers", "2"])
        if code:
            raise SystemExit(code)
        atomic_write_text(Path(args.out) / "README.md", report(args.out))


if __name__ == "__main__":
    main()
