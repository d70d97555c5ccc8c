"""Forms of the layout law tried on the layout study (issue 23, item 2): ``ondevice`` and variants.

    python docs/layout_forms.py results/layout_isoflop [--points-per-param 3]

Fits each form to the study's completed runs (in-sample, no bootstrap: a first look at which terms
the data ask for) and prints its RMSE, its layout coefficients and the seed-0 residuals by layout and
d_model. The forms, each the ``ondevice`` law (joint_moe with the N term times ``(1 + g (G^-eta - 1))
(1 + n_shared)^-sigma``) plus:

* ``width``: the N term times ``1 + (w / d_expert)^rho``: narrow experts learn less per parameter (on
  the smallest budget, E16 at G = 8 has experts 8-16 wide below d48 and sits 0.02-0.05 above the
  plain law there, and on it from d48). At phone scale (experts 256-1024 wide) the factor is ~1, so
  the law can prefer a moderate G at toy scale and a large one on a phone.
* ``shared_d``: the D term times ``(1 + n_shared)^-sigma_d``: a shared expert helps most when a run
  sees few tokens (at 513 steps the shared layouts sit ~0.04 below the plain law and the others ~0.04
  above).

Preliminary (2026-12-06, the smallest budget only, 81 runs, mostly one seed; with ``--points-per-param
3`` so that 81 runs fit 18 parameters): RMSE ondevice 0.0178 (eta at its bound 4: G is a step), width
0.0158, shared_d 0.0159, both 0.0141. The verdict waits for the three budgets (docs/design.md, section
5, records the chosen form when it is made).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import numpy as np

import moe_scaling.laws.fit as fitmod
from moe_scaling.laws.registry import LAWS, ONDEVICE, _joint_terms, _lse
from moe_scaling.laws.tables import load_runs


def variant(name: str, width: bool = False, shared_d: bool = False):
    """``ondevice`` with the ``width`` and/or ``shared_d`` terms (module docstring), registered as ``name``."""

    def log_form(q, X, xp):
        n_term, d_term = _joint_terms(q, X, xp)
        n_term = (n_term + xp.log1p(q["g"] * (xp.exp(-q["eta"] * xp.log(X["granularity"])) - 1.0))
                  - q["sigma"] * xp.log1p(X["n_shared"]))
        if width:
            n_term = n_term + xp.log1p(xp.exp(q["rho"] * (q["log_w"] - xp.log(X["d_expert"]))))
        if shared_d:
            d_term = d_term - q["sigma_d"] * xp.log1p(X["n_shared"])
        return _lse(xp, n_term, d_term, q["log_c"])

    params, bounds, grid = list(ONDEVICE.params), dict(ONDEVICE.bounds), dict(ONDEVICE.grid)
    reference, log_params, inputs = dict(ONDEVICE.reference), set(ONDEVICE.log_params), list(ONDEVICE.inputs)
    if width:
        params += ["w", "rho"]
        bounds.update(w=(1e-3, 1e4), rho=(0.0, 4.0))
        grid.update(log_w=(0.0, 2.0), rho=(1.0,))
        reference.update(w=1e-3, rho=1.0)
        log_params.add("w")
        inputs.append("d_expert")
    if shared_d:
        params.append("sigma_d")
        bounds["sigma_d"] = (-2.0, 2.0)
        grid["sigma_d"] = (0.0,)
        reference["sigma_d"] = 0.0
    law = dataclasses.replace(ONDEVICE, name=name, inputs=tuple(inputs), params=tuple(params), bounds=bounds,
                              log_params=frozenset(log_params), grid=grid, log_form=log_form,
                              reference=reference, fix_order=tuple(reversed(params)), in_auto=False)
    LAWS[name] = law            # Fit.predict looks laws up by name
    return law


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the layout study's sweep folder")
    ap.add_argument("--points-per-param", type=float, default=5.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    fitmod.layout_effects = lambda *a, **k: None   # its probe rows lack d_expert; not needed for a first look
    runs, _ = load_runs(args.results)
    for law in (ONDEVICE, variant("ondevice+width", width=True), variant("ondevice+shared_d", shared_d=True),
                variant("ondevice+width+shared_d", width=True, shared_d=True)):
        f = fitmod.fit_law(law, runs, bootstrap=0, heldout_frac=0.0, kfold=0, points_per_param=args.points_per_param)
        res = runs.assign(res=runs["loss"] - np.asarray(f.predict(runs)))
        res["layout"] = [f"E{int(e)} G{int(g)}{' +sh' if s else ''}"
                         for e, g, s in zip(res.expansion, res.granularity, res.n_shared)]
        layout = {k: round(v, 3) for k, v in f.params.items() if k in ("g", "eta", "sigma", "w", "rho", "sigma_d")}
        print(f"\n{law.name}: {len(runs)} runs, RMSE {f.metrics['rmse']:.4f}, {layout}; {'; '.join(f.notes)}")
        seed0 = res[res.seed == 0] if "seed" in res else res
        print(seed0.pivot_table(index="layout", columns="d_model", values="res").round(3).to_string())


if __name__ == "__main__":
    main()
