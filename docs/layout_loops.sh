#!/usr/bin/env bash
# The layout study's closed loops (issue 23, item 5), from its chosen law to three validation.json files.
#
#     bash docs/layout_loops.sh [FIT.json]      # default: the form docs/layout_forms.py chose and saved
#
# For each training compute C (two inside the study's range, one ~2x beyond its largest, 1.35e13) it plans
# the loop at each memory budget of MEMORY and keeps, among the plans that pass the binding targets
# (moe_scaling.design.validate.verdict on a plan: memory or latency binds the optimum, it uses >= 90% of
# the memory, no search-space bound), the one with the fewest optimizer steps over its candidates and
# seeds (the cheapest loop to train; ties: the smaller budget). The rule is fixed before the law is: no
# budget is chosen by what a loop measures. Then it trains that loop (3 seeds per candidate, as the study
# trained: --like its grid) into results/layout_validation/c<C>/; rerunning resumes where a loop stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
FIT=${1:-$(sed -n 's/.*(saved: \(.*\.json\))$/\1/p' fits/layout_forms/chosen.txt)}
[ -f "$FIT" ] || { echo "layout_loops: no fit $FIT (run docs/layout_forms.py --bootstrap 200 --save fits/layout_forms first)" >&2; exit 2; }
COMPUTE=(1.5e12 4.5e12 2.8e13)
MEMORY=(60KB 80KB 100KB 125KB 150KB 200KB 250KB 300KB 400KB 500KB 600KB 800KB 1MB 1.5MB 2MB)
FLAGS=(--compute-rule 3x-forward --context 128 --like sweeps/layout_isoflop.yaml)
for C in "${COMPUTE[@]}"; do
    out=${LOOPS_OUT:-results/layout_validation}/c$C
    if [ ! -f "$out/budget.txt" ]; then
        mkdir -p "$out/plans"
        for M in "${MEMORY[@]}"; do
            moe-fit "$FIT" --budget-mem "$M" --train-compute "$C" "${FLAGS[@]}" --validate "$out" --plan --json \
                > "$out/plans/$M.json"
        done
        python - "$out" "${MEMORY[@]}" <<'PY'
import json, sys
from pathlib import Path
out, budgets = Path(sys.argv[1]), sys.argv[2:]
plans = {m: json.loads((out / "plans" / f"{m}.json").read_text())["validation"] for m in budgets}
for m, p in plans.items():
    print(f"{out.name} memory {m}: memory use {p['memory_use']:.3f}, binding {p['binding']}, "
          f"{p['steps']} steps; {'passes' if p['verdict']['passed'] else '; '.join(p['verdict']['unmet'])}")
passing = [m for m in budgets if plans[m]["verdict"]["passed"]]
if not passing:
    sys.exit(f"layout_loops: no memory budget of {' '.join(budgets)} binds the optimum at {out.name}")
best = min(passing, key=lambda m: plans[m]["steps"])           # min keeps the first (smaller) of equals
(out / "budget.txt").write_text(best + "\n")
print(f"{out.name}: {best} (the passing plan with the fewest steps, {plans[best]['steps']})")
PY
    fi
    M=$(cat "$out/budget.txt")
    echo "c$C: training the loop under $M"
    moe-fit "$FIT" --budget-mem "$M" --train-compute "$C" "${FLAGS[@]}" --validate "$out" --seeds 3 --workers 2
done
