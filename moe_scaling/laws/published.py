"""Fits of published coefficients, and the law a sweet-spot search chooses the layout with.

:func:`published_fit` wraps a paper's coefficients as a :class:`~moe_scaling.laws.fit.Fit` (no data,
no bootstrap samples); :func:`layout_law` gives the search a law that reads granularity: the fit itself
when it does, else a ``joint_moe`` fit with Krajewski et al. 2024's published granularity factor on its
parameter term (:func:`with_published_granularity`); :func:`fitted_scale` names the scale each term's
coefficients come from, which the search prints beside its answer (issue 23, item 6).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from moe_scaling.laws.errors import FitError
from moe_scaling.laws.fit import Fit
from moe_scaling.laws.registry import LAWS, Law, get_law

__all__ = ["published_fit", "with_published_granularity", "layout_law", "fitted_scale"]


def published_fit(law: str | Law, params: Mapping[str, float], reference: str, notes: Sequence[str] = ()) -> Fit:
    """A :class:`Fit` of published coefficients: no data and no bootstrap samples, so
    :meth:`Fit.predict_interval` raises :class:`NoSamplesError`."""
    lw = get_law(law)
    missing = [p for p in lw.params if p not in params]
    if missing:
        raise FitError(f"published {lw.name}: missing {', '.join(missing)}")
    return Fit(law=lw.name, params={p: float(params[p]) for p in lw.params}, source="published",
               settings={"reference": reference}, notes=tuple(notes))


def with_published_granularity(fit: Fit) -> Fit:
    """A joint_moe fit that also reads granularity: Krajewski et al. 2024's published granularity
    factor on its parameter term, as an ``ondevice`` fit.

    Krajewski et al. write the parameter term ``(g / G^gamma + a) / N^alpha``; relative to coarse
    experts (G = 1) that is the factor ``(g G^-gamma + a) / (g + a) = 1 + g' (G^-gamma - 1)`` with
    ``g' = g / (g + a)``, which is exactly ``ondevice``'s granularity factor with ``g = g'`` and
    ``eta = gamma`` (registry :data:`~moe_scaling.laws.registry.KRAJEWSKI`'s reference: g' = 0.104,
    eta = 0.58). The joint law's coefficients are taken as those of G = 1 experts, and ``sigma = 0``:
    no published law prices a shared expert, so ``n_shared`` stays unread (the search says so).
    Bootstrap samples, when the fit has them, carry the factor's fixed values. ``settings["terms"]``
    names the source of each term and the scale it was fitted at.

    Not used by the search by default, for two measured reasons (README, Results): the factor falls
    monotonically in G, so a search under it always takes the space's largest G (a search-space bound
    chooses, not the law; Krajewski et al. price fine granularity through routing compute, which this
    loss term does not hold); and it lowers the loss of E = 1 layouts (every routed width equal to
    the dense FFN) as much as that of real MoE, a regime the paper did not fit. At 2 GB it turns
    every compute from 1e19 to 1e25 into "MoE at G = 16", E = 1 from 1e22 on."""
    if fit.law != "joint_moe":
        raise FitError(f"a published granularity factor goes on a joint_moe fit; this one is {fit.law}")
    k = LAWS["krajewski"].reference
    extra = {"g": k["g"] / (k["g"] + k["a"]), "eta": k["gamma"], "sigma": 0.0}
    law = LAWS["ondevice"]
    samples = None
    if fit.samples is not None:
        cols = dict(zip(LAWS["joint_moe"].params, np.asarray(fit.samples, float).T))
        samples = np.column_stack([cols[p] if p in cols else np.full(len(fit.samples), extra[p]) for p in law.params])
    terms = [{"term": "N, D and expansion (Ehat)", "law": "joint_moe", "source": fit.settings.get("reference")
              or f"fitted to {fit.n_points} runs", "scale": fitted_scale(fit)},
             {"term": "granularity factor 1 + g (G^-eta - 1), g = 0.104, eta = 0.58", "law": "krajewski",
              "source": LAWS["krajewski"].citation + ": g / (g + a) and gamma of its published a = 18.1, "
                        "g = 2.1, gamma = 0.58",
              "scale": "the paper's own fine-grained MoE runs (not re-checked here); applied relative to G = 1"},
             {"term": "shared expert", "law": None, "source": "none published: n_shared is not read",
              "scale": None}]
    return dataclasses.replace(
        fit, law="ondevice", params={**fit.params, **extra}, samples=samples,
        fixed={**fit.fixed, **extra}, settings={**fit.settings, "terms": terms},
        notes=tuple(fit.notes) + ("granularity from Krajewski et al. 2024's published factor on top of the "
                                  "joint law (relative to G = 1); no published shared-expert term",))


def layout_law(fit: Fit) -> Fit:
    """The fit a sweet-spot search chooses the layout with (issue 23, item 6): ``fit`` itself when
    its law reads granularity (e.g. an ``ondevice`` fit of the user's own layout study); a
    ``joint_moe`` fit (the published default or the user's) with Krajewski et al. 2024's published
    granularity factor put on its parameter term (:func:`with_published_granularity`); any other
    fit unchanged (its search fixes the layout and says so). The shared expert is read only by a
    fit that reads it: no published law prices one."""
    if "granularity" in fit.law_obj.inputs or fit.law != "joint_moe":
        return fit
    return with_published_granularity(fit)


_PUBLISHED_SCALE = {"joint_moe": "Ludziejewski et al. 2025: 280+ runs up to 2.7B active / 5B total parameters"}


def fitted_scale(fit: Fit) -> str:
    """The scale a fit's coefficients come from: a published law's own runs (as its paper states),
    or the runs fitted here and their largest training compute."""
    if fit.source == "published":
        return _PUBLISHED_SCALE.get(fit.law, "the authors' own runs (see the citation)")
    m = (fit.metrics.get("max_train_compute") or {}).get("3x-forward")
    return f"{fit.n_points} runs" + (f", training compute up to {m:.3g} FLOPs (3 x forward)" if m else "")
