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
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moe_scaling.laws.registry import Law

__all__ = ["middle_point", "layout_effects"]


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
