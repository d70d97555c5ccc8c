"""What a fitted law says about the layout knobs (granularity G, shared experts) at its data's
middle size, with a bootstrap interval: the numbers that say whether a study identified them.

At the reference point (:func:`middle_point`) and each MoE expansion E of the fitted runs,

    gap_granularity(E) = L(G = 1) - L(G*)       G* = argmin over the runs' G values of L (point fit)
    gap_shared(E)      = L(n_shared = 0) - L(n_shared = 1)    at G*

where L is the law's predicted loss with every other input held. Positive gaps favour the finer or
the shared layout. Each gap's interval is the percentile interval of the same difference over the
fit's bootstrap draws (G* held at the point fit's choice), at the fit's interval level; its width
beside the pooled seed noise floor says whether the study told the layouts apart (issue 23: a
width under 2 noise floors).

:func:`identification` is that test in full (issue 23, item 2): a bootstrapped fit identified the
layout when no free layout coefficient (:data:`LAYOUT_TERMS`) has an interval that reaches a bound
(a bound, not the data, would then cut it) and every gap's interval is narrower than
:data:`MAX_GAP_WIDTH` noise floors.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moe_scaling.laws.registry import Law

__all__ = ["LAYOUT_TERMS", "MAX_GAP_WIDTH", "middle_point", "layout_effects", "identification"]

LAYOUT_TERMS = ("g", "eta", "sigma", "w", "rho", "sigma_d")
"""The coefficients of the registered laws' layout factors (``ondevice``'s and ``layout``'s)."""

MAX_GAP_WIDTH = 2.0
"""A layout gap's interval must be narrower than this many pooled noise floors (issue 23, item 2)."""


def middle_point(cols: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The fitted runs' middle size: the median-ranked distinct ``params_active`` (the lower middle
    of an even count), with the median tokens of the runs of that size and their embedding count,
    and (when the runs give ``d_expert``) its FFN width ``d_ff = d_expert * G``, from which a layout
    of granularity G at this size has experts ``d_ff / G`` wide."""
    active = np.asarray(cols["params_active"], float)
    sizes = np.unique(active)
    size = sizes[(len(sizes) - 1) // 2]
    at = active == size
    point = {"params_active": float(size), "tokens": float(np.median(np.asarray(cols["tokens"], float)[at]))}
    for extra in ("params_embedding", "params_total"):
        if extra in cols:
            point[extra] = float(np.median(np.asarray(cols[extra], float)[at]))
    if "d_expert" in cols and "granularity" in cols:
        d_ff = np.asarray(cols["d_expert"], float) * np.asarray(cols["granularity"], float)
        point["d_ff"] = float(np.median(d_ff[at]))
    return point


def _gap(law: Law, params: np.ndarray, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    """L(a) - L(b) for one parameter vector or each row of ``params``."""
    params = np.atleast_2d(params)
    return np.array([float(law.predict(p, a)[0] - law.predict(p, b)[0]) for p in params])


def layout_effects(law: Law, params: Mapping[str, float], samples: np.ndarray | None,
                   cols: Mapping[str, np.ndarray], level: float = 0.95,
                   noise_floor: float | None = None) -> dict[str, Any] | None:
    """The granularity and shared-expert gaps of the module docstring, per MoE expansion of the
    runs; None when the law reads neither knob or the runs hold no MoE expansion. ``params``: the
    point fit; ``samples``: bootstrap draws ``(S, n_params)`` in ``law.params`` order, natural units
    (:attr:`moe_scaling.laws.fit.Fit.samples`)."""
    reads = [k for k in ("granularity", "n_shared") if k in law.inputs]
    expansions = sorted({float(e) for e in np.asarray(cols.get("expansion", []), float) if e > 1})
    if not reads or not expansions:
        return None
    point = middle_point(cols)
    grans = sorted({float(g) for g in np.asarray(cols.get("granularity", [1.0]), float)}) or [1.0]
    theta = np.array([[float(params[p]) for p in law.params]])          # natural units, like samples
    tail = 100.0 * (1.0 - level) / 2.0

    def row(**knobs: float) -> dict[str, np.ndarray]:
        r = {**point, "granularity": 1.0, "n_shared": 0.0, **knobs}
        if "d_ff" in point:
            r["d_expert"] = point["d_ff"] / r["granularity"]
        return {k: np.array([v]) for k, v in r.items()}

    def interval(a, b) -> dict[str, Any]:
        value = float(_gap(law, theta, a, b)[0])
        out = {"gap": value, "interval": None, "width": None}
        if samples is not None and len(samples):
            draws = _gap(law, samples, a, b)
            lo, hi = np.percentile(draws, [tail, 100.0 - tail])
            out.update(interval=[float(lo), float(hi)], width=float(hi - lo))
            if noise_floor:
                out["width_over_noise_floor"] = float((hi - lo) / noise_floor)
        return out

    per_e = []
    for e in expansions:
        entry: dict[str, Any] = {"expansion": e}
        best = 1.0
        if "granularity" in reads:
            losses = [float(law.predict(theta[0], row(expansion=e, granularity=g))[0]) for g in grans]
            best = grans[int(np.argmin(losses))]
            entry["predicted_by_granularity"] = dict(zip(map(str, grans), losses))
            entry["best_granularity"] = best
            entry["granularity"] = interval(row(expansion=e, granularity=1.0), row(expansion=e, granularity=best))
        if "n_shared" in reads:
            entry["shared"] = interval(row(expansion=e, granularity=best, n_shared=0.0),
                                       row(expansion=e, granularity=best, n_shared=1.0))
        per_e.append(entry)
    return {"at": point, "level": level, "noise_floor": noise_floor, "granularities": grans,
            "by_expansion": per_e}


def identification(effects: Mapping[str, Any] | None, at_bounds: list[str] | None,
                   free: list[str], max_width: float = MAX_GAP_WIDTH) -> dict[str, Any]:
    """``{"identified": bool, "unmet": [reasons]}``: whether a bootstrapped fit identified the
    layout knobs (module docstring). ``effects``: :func:`layout_effects` of the fit (None: the law
    reads no layout knob); ``at_bounds``: the free coefficients whose intervals reach a bound
    (:func:`moe_scaling.laws.fit.intervals_at_bounds`; None: no bootstrap); ``free``: the names of
    the fit's free coefficients (a held layout coefficient is the user's choice, not the data's)."""
    if effects is None:
        return {"identified": False, "unmet": ["the law reads neither granularity nor the shared expert"]}
    unmet = []
    if at_bounds is None:
        unmet.append("no bootstrap: no intervals to judge (fit with bootstrap > 0)")
    else:
        unmet += [f"{p}'s interval reaches its bound" for p in at_bounds if p in LAYOUT_TERMS and p in free]
    floor = effects.get("noise_floor")
    if not floor:
        unmet.append("no noise floor (the runs repeat no configuration over seeds): gap widths cannot be judged")
    for entry in effects["by_expansion"]:
        for key in ("granularity", "shared"):
            width = (entry.get(key) or {}).get("width")
            if key in entry and floor and width is not None and not width < max_width * floor:
                unmet.append(f"E {entry['expansion']:g}: the {key} gap's interval is {width / floor:.2f} noise "
                             f"floors wide (at most {max_width:g})")
    return {"identified": not unmet, "unmet": unmet}
