r"""One law on one data set as an optimisation problem: Huber objective, bounds, fixed parameters.

:func:`make_problem` prepares a table for a law (:func:`~moe_scaling.laws.tables.prepare`), decides
which parameters are fitted (:func:`_fixed_params`: the user's ``--fix`` plus, with too few runs, the
law's reference values in its ``fix_order``) and returns a :class:`Problem`. The objective minimised
over the internal coordinates ``q`` (:mod:`moe_scaling.laws.registry`; log space for positive
scales), with row weights ``w`` (1 fitted, 0 held out, k drawn k times), is the normalised Huber
loss on log residuals (docs/design.md, section 5):

.. math::
   r_i = \log L_i - \log \hat L(q; x_i),\qquad
   h_\delta(r) = \begin{cases} r^2/2 & |r| \le \delta \\ \delta (|r| - \delta/2) & |r| > \delta \end{cases},
   \qquad f(q; w) = \frac{\sum_i w_i\, h_\delta(r_i)}{\delta \sum_i w_i}.

:func:`fit_starts` minimises it from many starts with the batched L-BFGS of
:mod:`moe_scaling.laws.lbfgs` (float32 screen, float64 polish).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from moe_scaling.laws.errors import FitError
from moe_scaling.laws.lbfgs import NoFiniteStart, Objective, multi_start
from moe_scaling.laws.registry import Law, get_law
from moe_scaling.laws.tables import FitData, prepare

__all__ = ["Problem", "huber_value", "make_problem", "fit_starts"]


@functools.lru_cache(maxsize=None)
def huber_value(law: Law) -> Callable[..., Any]:
    """The batched objective ``value(Q, W, data)`` of ``law`` for :class:`~moe_scaling.laws.lbfgs.Objective`:
    ``Q`` internal parameters ``(B, n_params)``, ``W`` row weights ``(B, n)``, ``data`` with
    ``cols`` (the law's input columns), ``logy`` (log losses) and ``delta`` (the Huber threshold).
    One function object per law, so its compiled kernels are reused."""
    names = law.internal_names

    def value(Q, W, data):
        import jax.numpy as jnp
        q = {n: Q[:, i:i + 1] for i, n in enumerate(names)}
        r = data["logy"] - law.log_form(q, data["cols"], jnp)
        a = jnp.abs(r)
        delta = data["delta"]
        h = jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
        return jnp.sum(W * h, axis=-1) / (delta * jnp.sum(W, axis=-1))

    return value


@dataclass(frozen=True, eq=False)
class Problem:
    """One law on one data set: what the optimiser minimises.

    Parameters are internal coordinates (:mod:`moe_scaling.laws.registry`) in ``law.params`` order; a fixed
    parameter has ``lo == hi`` (the projection pins it, so fixing never recompiles anything).
    ``cols``/``logy`` are the inputs and log losses, ``delta`` the Huber threshold. Build one with
    :func:`make_problem`."""

    law: Law
    lo: np.ndarray
    hi: np.ndarray
    cols: dict[str, np.ndarray]
    logy: np.ndarray
    delta: float

    @property
    def free(self) -> tuple[int, ...]:
        """Indices of the fitted parameters."""
        return tuple(int(i) for i in np.nonzero(self.lo < self.hi)[0])

    def clip(self, x: np.ndarray) -> np.ndarray:
        """``x`` inside the bounds (fixed parameters set to their values)."""
        return np.clip(np.asarray(x, np.float64), self.lo, self.hi)

    @property
    def objective(self) -> Objective:
        """What :mod:`moe_scaling.laws.lbfgs` minimises: :func:`huber_value` on these data."""
        return Objective(value=huber_value(self.law), lo=self.lo, hi=self.hi,
                         data={"cols": self.cols, "logy": self.logy, "delta": self.delta})


def _fixed_params(law: Law, n: int, fix: Mapping[str, float], per_param: float, notes: list[str]) -> dict[str, float]:
    """Parameters to hold fixed: the user's, plus the law's reference values in its ``fix_order``
    while there are fewer than ``per_param`` runs per free parameter (noted in ``notes``)."""
    fixed = {}
    for name, value in fix.items():
        if name not in law.params:
            raise FitError(f"--fix {name}={value}: law {law.name} has no parameter {name!r}; "
                           f"its parameters are {', '.join(law.params)}")
        lo, hi = law.bounds[name]
        if not (math.isfinite(value) and lo <= value <= hi):
            raise FitError(f"--fix {name}={value}: outside the law's bounds [{lo:g}, {hi:g}]")
        fixed[name] = float(value)
    n_free = len(law.params) - len(fixed)
    if n_free == 0:
        raise FitError(f"--fix: every parameter of law {law.name} is fixed; leave at least one free")
    if per_param and n < per_param * n_free:
        if n < per_param:
            raise FitError(f"too few points for law {law.name}: {n} runs; even with all but one parameter "
                           f"fixed to reference values a fit needs {per_param:g}; add runs")
        priors = [p for p in law.fix_order if p not in fixed]
        take = priors[: n_free - max(1, int(n // per_param))]
        if n_free - len(take) > n // per_param:
            raise FitError(f"too few points for law {law.name}: {n} runs for {n_free} free parameters "
                           f"(want {per_param:g} per parameter); fix parameters with --fix name=value")
        for p in take:
            fixed[p] = float(law.reference[p])
        notes.append(f"only {n} runs for {n_free} free parameters (want >= {per_param:g} per parameter): "
                     f"fixed {', '.join(f'{p}={fixed[p]:g}' for p in take)} to the law's reference values "
                     f"({law.citation.split(';')[0].split(',')[0]}) instead of fitting them")
    return fixed


def make_problem(law: str | Law, data: pd.DataFrame | Mapping[str, Any], *, huber_delta: float = 1e-3,
                 fix: Mapping[str, float] | None = None, points_per_param: float = 5.0,
                 drop_highest_loss: int = 0, min_steps: int = 0) -> tuple[Problem, FitData, dict[str, float], list[str]]:
    """Prepare ``data`` for ``law`` and decide which parameters are fitted.
    Returns (problem, data, fixed parameters, notes)."""
    law = get_law(law)
    if not (huber_delta > 0 and math.isfinite(huber_delta)):
        raise FitError(f"--huber-delta {huber_delta}: must be a positive number, e.g. 1e-3")
    d = prepare(law, data, drop_highest_loss, min_steps)
    notes = list(d.notes)
    fixed = _fixed_params(law, d.n, fix or {}, points_per_param, notes)
    lo, hi = law.internal_bounds()
    for i, p in enumerate(law.params):
        if p in fixed:
            lo[i] = hi[i] = law.to_internal({**law.reference, **fixed})[i]
    problem = Problem(law=law, lo=lo, hi=hi, cols=d.cols, logy=np.log(d.loss), delta=float(huber_delta))
    return problem, d, fixed, notes



def fit_starts(problem: Problem, starts: np.ndarray, W: np.ndarray | None = None, polish: int = 8,
               screen_evals: int = 100) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The best fit from ``starts`` (internal parameters ``(S, n_params)``) for every row of weights
    ``W`` (``(R, n)``, default one row of ones): :func:`~moe_scaling.laws.lbfgs.multi_start` (every
    start in float32 for at most ``screen_evals`` evaluations, the ``polish`` best distinct results
    of each row refined in float64, best kept).
    Returns (x ``(R, n_params)``, objective ``(R,)``, the distinct polished optima of each row, best first)."""
    try:
        return multi_start(problem.objective, starts, W, polish=polish, screen_evals=screen_evals)
    except NoFiniteStart:
        raise FitError(f"law {problem.law.name}: no start gave a finite objective; check the data's units") from None
