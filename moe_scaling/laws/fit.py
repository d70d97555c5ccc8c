"""Robust scaling-law fits: multi-start L-BFGS-B, bootstrap intervals, held-out selection.

The procedure (docs/design.md, section 5; Besiroglu et al. 2024's reading of Hoffmann et al. 2022):

* residuals ``r = log L - log Lhat`` under a Huber loss (``huber_delta``, default 1e-3), the
  optimiser moving parameters in log space where they are positive (:mod:`moe_scaling.laws.registry`;
  the objective and the fixed parameters: :mod:`moe_scaling.laws.problem`);
* bound-constrained L-BFGS from every start of the law's grid, best kept. All starts run at once:
  :func:`~moe_scaling.laws.lbfgs.minimize_batch` is a batched projected L-BFGS written in JAX (one
  objective + autodiff gradient evaluation per step for the whole batch, starts refilled into
  finished slots). The grid is first run in float32 (``screen``), then the best distinct results
  are polished in float64 to tight tolerances (:func:`~moe_scaling.laws.problem.fit_starts`);
* starts: the law's grid plus seeded random draws over the grid's range, never the law's reference
  coefficients (a fit must find the answer, not be handed it);
* bootstrap over runs (resampling rows with replacement, each refit started from a seeded subset
  of the same starts plus the full-data optimum, the best of them kept: cold starts alone missed the
  lower optimum of 23 of 24 resamples of the layout study, while the optimum alone would keep
  every refit in its basin and narrow the intervals) for
  percentile intervals on every coefficient and, through the kept parameter samples, on every
  prediction (:meth:`Fit.predict_interval`);
* held-out error: the largest-compute runs held out (``heldout_rmse``) and k-fold; all those
  refits run from the full grid, as batches of row weights, so no held-out run leaks into a fit.
  :func:`select_law` (``moe-fit --law auto``) picks the law with the lowest held-out RMSE;
* too few points for the free parameters (fewer than ``points_per_param`` per parameter): the
  law's reference coefficients are fixed in its ``fix_order`` and the fit's notes say so.

The result is a frozen :class:`Fit`: ``predict(X)``, ``predict_interval(X, level)``,
``save(path)``; :func:`load_fit` reads one back. ``X`` is a dict of canonical column arrays.
Run tables are read by :mod:`moe_scaling.laws.tables`.

:class:`Fit` and every way to fit or load one share this module; the run statistics are in
:mod:`~moe_scaling.laws.noise`, the layout gaps in :mod:`~moe_scaling.laws.effects`, and fits of
published coefficients and the law a search chooses the layout with in :mod:`~moe_scaling.laws.published`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from moe_scaling.files import atomic_write_text, json_default
from moe_scaling.laws.errors import FitError, NoSamplesError
from moe_scaling.laws.noise import MIN_FAMILY_DOF, max_train_compute, mixture_quantile, noise_family, pooled_seed_sd
from moe_scaling.laws.problem import Problem, fit_starts, make_problem
from moe_scaling.laws.registry import LAWS, Law, get_law
from moe_scaling.laws.effects import identification, layout_effects
from moe_scaling.laws.tables import FitData, holdout_mask

__all__ = ["Fit", "fit_law", "select_law", "load_fit", "bootstrap_refits", "fit_starts_and_cold", "FORMAT"]

FORMAT = "moe-scaling-fit/1"


def bootstrap_refits(problem: Problem, starts: np.ndarray, reps: int, seed: int, polish: int = 1) -> np.ndarray:
    """``reps`` refits on runs drawn with replacement (multinomial row weights from
    ``numpy.random.default_rng(seed)``), each from every row of ``starts`` (internal parameters;
    :func:`fit_law` passes its cold starts and the full-data optimum) through :func:`~moe_scaling.laws.problem.fit_starts`
    (float32 screen, the ``polish`` best distinct results of each refit polished in float64).
    Returns internal parameters ``(reps, n_params)``; a row is NaN where every start failed."""
    n = problem.logy.size
    draws = np.random.default_rng(seed).integers(0, n, size=(reps, n))
    W = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)
    x, f, _ = fit_starts(problem, np.atleast_2d(starts), W, polish=polish)
    x[~np.isfinite(f)] = np.nan
    return x


def fit_starts_and_cold(problem: Problem, seed: int, *, starts: np.ndarray | None = None, random_starts: int = 32,
                        bootstrap_starts: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The starts :func:`fit_law` uses, in internal coordinates: ``(starts, cold)``. ``starts``
    (default: the law's grid plus ``random_starts`` uniform draws over its range from
    ``numpy.random.default_rng(seed)``; never the reference coefficients), clipped to the bounds
    and deduplicated, for the full-data and held-out fits; ``cold``, a seeded subset of
    ``bootstrap_starts`` of them (the same for every refit), from which, with the full-data
    optimum, each bootstrap refit starts (:func:`bootstrap_refits`). ``bench/fit_speed.py`` times refits from exactly these."""
    law = problem.law
    rng = np.random.default_rng(seed)
    if starts is None:
        starts = np.vstack([law.start_grid(), law.random_starts(random_starts, rng)])
    starts = np.unique(problem.clip(starts), axis=0)
    cold = starts[np.sort(rng.permutation(len(starts))[:max(1, bootstrap_starts)])]
    return starts, cold


@dataclass(frozen=True, eq=False)
class Fit:
    """A fitted (or published) scaling law.

    Use :meth:`predict` and :meth:`predict_interval` with a dict of canonical column arrays
    (``params_active``, ``params_total``, ``params_embedding``, ``tokens``, ``expansion``,
    ``granularity``, ``n_shared``; extra columns are ignored). Save with :meth:`save`, load with
    :func:`load_fit`.

    Attributes:
        law: the law's registry name (:data:`moe_scaling.laws.registry.LAWS`).
        params: fitted coefficients, natural units.
        intervals: bootstrap percentile interval per coefficient at ``interval_level`` ({} when
            there is no bootstrap); fixed coefficients have a zero-width interval.
        interval_level: coverage of ``intervals`` (e.g. 0.95).
        fixed: coefficients held fixed (``--fix`` or priors for small data), natural units.
        samples: bootstrap parameter draws kept, shape ``(S, n_params)`` in ``law.params`` order,
            or None (published coefficients).
        metrics: ``rmse`` (in-sample, loss units), ``heldout_rmse``, ``kfold_rmse``, ...
        n_points: runs fitted.
        data_hash: sha256 of the fitted columns.
        settings: how it was fitted (Huber delta, bootstrap count, seed, starts, ...).
        notes: what a reader must know (dropped rows, fixed parameters, parameters at bounds).
        source: ``fit`` or ``published``.
    """

    law: str
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    interval_level: float | None = None
    fixed: dict[str, float] = field(default_factory=dict)
    samples: np.ndarray | None = field(default=None, repr=False)
    metrics: dict[str, Any] = field(default_factory=dict)
    n_points: int = 0
    data_hash: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    source: str = "fit"

    @property
    def law_obj(self) -> Law:
        """The :class:`~moe_scaling.laws.registry.Law` this fit is of."""
        return get_law(self.law)

    @property
    def has_samples(self) -> bool:
        """Whether :meth:`predict_interval` can answer (bootstrap samples are stored)."""
        return self.samples is not None and len(self.samples) > 0

    def predict(self, X: Mapping[str, Any]) -> np.ndarray:
        """Predicted loss for each row of ``X`` (dict of canonical column arrays), shape ``(n,)``."""
        return self.law_obj.predict(self.params, X)

    @property
    def noise_floor(self) -> float | None:
        """The pooled seed-to-seed sd of the fitted runs' losses
        (:func:`moe_scaling.laws.noise.pooled_seed_sd`), or None when the fitted table repeated no configuration with another seed."""
        v = self.metrics.get("noise_floor")
        return None if v is None else float(v)

    def seed_noise(self, X: Mapping[str, Any], n: int | None = None) -> np.ndarray | None:
        """The seed-to-seed sd a new run of each row of ``X`` has, shape ``(n,)``: the pooled floor of
        the fitted runs of its family (``noise_floor_by_family``, :func:`~moe_scaling.laws.noise.noise_family`
        of ``X``'s expansion and ``n_shared``): its own layout's ("moe x16") where that had at least
        :data:`~moe_scaling.laws.noise.MIN_FAMILY_DOF` dof, else every MoE run's ("moe") or dense's,
        else the pooled :attr:`noise_floor`; None without a floor. ``n``: the number of rows when
        the caller has it (else one prediction counts them). (On the layout study E16 runs scatter
        ~5.5x more than dense ones, E4 with a shared expert ~2.6x: one pooled sd is too wide for some
        and too narrow for others.)"""
        pooled = self.noise_floor
        if not pooled:
            return None
        n = len(np.atleast_1d(self.predict(X))) if n is None else n
        families = {b["family"]: b for b in self.metrics.get("noise_floor_by_family") or []}
        if not families or X.get("expansion") is None:
            return np.full(n, pooled)
        expansion = np.broadcast_to(np.asarray(X["expansion"], float), (n,))
        shared = np.broadcast_to(np.asarray(X["n_shared"], float) > 0 if X.get("n_shared") is not None
                                 else False, (n,))

        def floor(e: float, s: bool) -> float:
            if not math.isfinite(e):                  # no expansion for this row: no family
                return pooled
            own = families.get(noise_family(e, s))
            if own and (own["family"] == "dense" or own.get("dof", 0) >= MIN_FAMILY_DOF):
                return own["noise_floor"]
            return (families.get("dense" if e <= 1.0 else "moe") or {"noise_floor": pooled})["noise_floor"]
        pairs, row_pair = np.unique(np.stack([expansion, shared]), axis=1, return_inverse=True)
        return np.array([floor(e, bool(s)) for e, s in pairs.T])[np.ravel(row_pair)]

    def predict_interval(self, X: Mapping[str, Any], level: float = 0.9, *,
                         seeds: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) interval at coverage ``level`` for what training ``X`` would measure.

        ``seeds=k`` (default 1): the mean loss of ``k`` new runs. Two sources of error add up: the
        law's parameter uncertainty (the loss predicted by each bootstrap sample, ``p_s``) and the
        seed-to-seed noise of a measured mean, ``sigma / sqrt(k)`` with ``sigma`` the row's
        :meth:`seed_noise` (its family's floor: dense or MoE). The interval holds the ``(1 -+ level) / 2`` quantiles of the mixture
        ``(1/S) sum_s N(p_s, sigma^2 / k)``, found by bisection on its CDF (deterministic, no
        sampling). Without a noise floor, and with ``seeds=None``, it is the percentile interval of
        the ``p_s`` alone: the uncertainty of the law itself, not of a run around it.
        Raises :class:`NoSamplesError` (a ValueError) when the fit has no samples."""
        if not self.has_samples:
            raise NoSamplesError(f"fit of law {self.law} ({self.source}) has no bootstrap samples, so no "
                                 "prediction interval; refit the runs with --bootstrap N")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level = {level}: must be in (0, 1), e.g. 0.9")
        if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
            raise ValueError(f"seeds = {seeds!r}: must be a whole number >= 1, or None for the law alone")
        pred = self.law_obj.predict(self.samples, X)
        tail = (1.0 - level) / 2.0
        sigma = None if seeds is None else self.seed_noise(X, n=np.shape(pred)[-1])
        with warnings.catch_warnings():                 # rows with missing inputs give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            if seeds is None or sigma is None:
                return np.nanpercentile(pred, 100 * tail, axis=0), np.nanpercentile(pred, 100 * (1 - tail), axis=0)
            return (mixture_quantile(pred, sigma / math.sqrt(seeds), tail),
                    mixture_quantile(pred, sigma / math.sqrt(seeds), 1.0 - tail))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see :func:`load_fit`)."""
        law = self.law_obj
        return {"format": FORMAT, "law": self.law, "source": self.source, "formula": law.formula,
                "citation": law.citation, "params": dict(self.params),
                "intervals": {k: list(v) for k, v in self.intervals.items()},
                "interval_level": self.interval_level, "fixed": dict(self.fixed),
                "metrics": self.metrics, "n_points": self.n_points, "data_hash": self.data_hash,
                "settings": self.settings, "notes": list(self.notes),
                "samples": None if self.samples is None else {
                    "params": list(law.params), "values": np.asarray(self.samples).tolist()}}

    def save(self, path: str | Path) -> None:
        """Write the fit as JSON (atomically; one bootstrap sample per line)."""
        d = self.to_dict()
        samples = d.pop("samples")
        text = json.dumps(d, indent=1, default=json_default)[:-2]
        if samples is None:
            text += ',\n "samples": null\n}\n'
        else:
            rows = ",\n  ".join(json.dumps(r) for r in samples["values"])
            text += f',\n "samples": {{"params": {json.dumps(samples["params"])}, "values": [\n  {rows}\n ]}}\n}}\n'
        atomic_write_text(path, text)


def load_fit(path: str | Path) -> Fit:
    """Read a fit written by :meth:`Fit.save` (or a published-coefficients file of the same format)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FitError(f"{path}: no such fit file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise FitError(f"{path}: not a fit JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FitError(f"{path}: not a fit JSON (format must be {FORMAT!r})")
    try:
        law = get_law(d["law"])
        params = {k: float(d["params"][k]) for k in law.params}
        samples = d.get("samples")
        if samples is not None:
            if list(samples["params"]) != list(law.params):
                raise ValueError(f"samples.params must be {', '.join(law.params)}")
            samples = np.asarray(samples["values"], np.float64).reshape(-1, len(law.params))
        return Fit(law=law.name, params=params,
                   intervals={k: (float(v[0]), float(v[1])) for k, v in (d.get("intervals") or {}).items()},
                   interval_level=d.get("interval_level"),
                   fixed={k: float(v) for k, v in (d.get("fixed") or {}).items()}, samples=samples,
                   metrics=d.get("metrics") or {}, n_points=int(d.get("n_points") or 0),
                   data_hash=d.get("data_hash"), settings=d.get("settings") or {},
                   notes=tuple(d.get("notes") or ()), source=d.get("source", "fit"))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise FitError(f"{path}: malformed fit JSON ({type(err).__name__}: {err})") from None


def _rmse(pred: np.ndarray, obs: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(obs)) ** 2)))



def _weight_rows(d: FitData, n_free: int, *, heldout_frac: float, heldout_by: str, kfold: int, seed: int,
                 notes: list[str]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One weight row per fit, fitted in one batch: all runs; then, with ``heldout_frac``, all but
    the largest (by ``heldout_by``; skipped, with a note, when no more than ``n_free`` runs would
    be left); then the ``kfold`` training folds (seeded permutation; skipped, with a note, below
    ``2 kfold`` runs). Returns (rows ``(R, n)``, held-out mask or None, fold index per run or None)."""
    rows, held, fold = [np.ones(d.n)], None, None
    if heldout_frac > 0:
        by = d.compute if heldout_by == "compute" else d.cols.get(heldout_by)
        if by is None and heldout_by in d.table:
            by = pd.to_numeric(d.table[heldout_by], errors="coerce").to_numpy(np.float64)
        if by is None:
            raise FitError(f"heldout_by = {heldout_by!r}: no such column")
        held = holdout_mask(by, heldout_frac)
        if (~held).sum() > n_free:
            rows.append((~held).astype(float))
        else:
            held = None
            notes.append("too few runs to hold out the largest ones: no heldout_rmse")
    if kfold > 1:
        if d.n >= 2 * kfold:
            fold = np.random.default_rng(seed).permutation(d.n) % kfold
            rows += [(fold != i).astype(float) for i in range(kfold)]
        else:
            notes.append(f"too few runs for {kfold}-fold cross-validation: no kfold_rmse")
    return np.stack(rows), held, fold


def _heldout_metrics(law: Law, nat: np.ndarray, d: FitData, held: np.ndarray | None, fold: np.ndarray | None,
                     kfold: int, heldout_by: str) -> dict[str, Any]:
    """``heldout_rmse`` (and its run count, rule and run ids) and ``kfold_rmse`` from the natural
    parameters ``nat`` fitted to the rows of :func:`_weight_rows`, in that order."""
    metrics: dict[str, Any] = {}
    r = 1
    if held is not None:
        metrics.update(heldout_rmse=_rmse(law.predict(nat[r], d.subset(held)), d.loss[held]),
                       heldout_n=int(held.sum()),
                       heldout_rule=f"largest {d.compute_rule if heldout_by == 'compute' else heldout_by}")
        if "run_id" in d.table:
            metrics["heldout_run_ids"] = [str(v) for v in d.table["run_id"][held]]
        r += 1
    if fold is not None:
        err = np.empty(d.n)
        for i in range(kfold):
            m = fold == i
            err[m] = law.predict(nat[r + i], d.subset(m)) - d.loss[m]
        metrics.update(kfold_rmse=float(np.sqrt(np.mean(err ** 2))), kfold=int(kfold))
    return metrics


def _bootstrap_intervals(problem: Problem, starts: np.ndarray, bootstrap: int, seed: int, level: float,
                         keep_samples: int, notes: list[str]) -> tuple[dict[str, tuple[float, float]], np.ndarray, int]:
    """Percentile intervals at ``level`` from ``bootstrap`` refits, each started from every row of
    ``starts`` (the best result kept); failed refits are left out (noted). Returns (intervals, the first
    ``keep_samples`` natural parameter draws, refits that succeeded)."""
    law = problem.law
    draws = bootstrap_refits(problem, starts, bootstrap, seed)
    ok = np.isfinite(draws).all(axis=1)
    if not ok.all():
        notes.append(f"{int((~ok).sum())} of {bootstrap} bootstrap refits failed and were left out")
    boot = law.to_natural(draws[ok])
    tail = 100.0 * (1.0 - level) / 2.0
    intervals = {p: (float(np.percentile(boot[:, i], tail)), float(np.percentile(boot[:, i], 100.0 - tail)))
                 for i, p in enumerate(law.params)}
    return intervals, boot[:keep_samples], int(ok.sum())


def _at_bound(law: Law, x: np.ndarray) -> np.ndarray:
    """Per coordinate of the internal point ``x``: within 1e-6 (relative) of a bound."""
    blo, bhi = law.internal_bounds()
    return np.minimum(x - blo, bhi - x) <= 1e-6 * np.maximum(1.0, np.abs(x))


def _bound_notes(law: Law, x: np.ndarray, params: Mapping[str, float], free: Sequence[int]) -> list[str]:
    """A note for every free parameter within 1e-6 (relative) of a bound of its internal coordinate."""
    near = _at_bound(law, x)
    return [f"{law.params[i]} = {params[law.params[i]]:.6g} is at its bound: the data do not pin it down; "
            "consider --fix" for i in free if near[i]]


def intervals_at_bounds(law: Law, intervals: Mapping[str, tuple[float, float]], free: Sequence[int]) -> list[str]:
    """The free coefficients whose interval reaches a bound (either endpoint within 1e-6 of it, in
    internal coordinates): at least ``(1 - level) / 2`` of the bootstrap refits ended on that bound,
    so the interval is cut by the bound, not by the data."""
    if not intervals:
        return []
    ends = np.array([[intervals[p][j] for p in law.params] for j in (0, 1)], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = _at_bound(law, law.to_internal(ends))
    return [law.params[i] for i in free if near[:, i].any()]


def fit_law(law: str | Law, data: pd.DataFrame | Mapping[str, Any], *, huber_delta: float = 1e-3,
            fix: Mapping[str, float] | None = None, bootstrap: int = 200, seed: int = 0,
            level: float = 0.95, kfold: int = 5, heldout_frac: float = 0.2, heldout_by: str = "compute",
            points_per_param: float = 5.0, starts: np.ndarray | None = None, random_starts: int = 32,
            bootstrap_starts: int = 16, keep_samples: int = 200, drop_highest_loss: int = 0,
            min_steps: int = 0) -> Fit:
    """Fit ``law`` to a runs table with canonical columns (see the module docstring).

    Args:
        law: a registered law name or :class:`~moe_scaling.laws.registry.Law`.
        data: DataFrame or dict of arrays with ``loss`` and the law's inputs; NaN/inf rows dropped.
        huber_delta: Huber threshold on log residuals.
        fix: natural-unit values of parameters to hold fixed.
        bootstrap: bootstrap refits (0: no intervals and no samples).
        seed: seeds the bootstrap draws and the k-fold split.
        level: coverage of the coefficient intervals (``Fit.intervals``).
        kfold: folds for ``kfold_rmse`` (0 or 1: none).
        heldout_frac: share of runs held out for ``heldout_rmse``, largest first, ties together
            (0: none).
        heldout_by: ``compute`` (training compute, :func:`moe_scaling.laws.tables.prepare`) or a
            column, e.g. ``params_active`` for "the largest model size".
        points_per_param: below this many runs per free parameter, reference values are fixed.
        starts: internal-coordinate starts ``(S, n_params)``; default the law's grid plus
            ``random_starts`` uniform draws over the grid's range (:meth:`Law.random_starts`, seeded
            by ``seed``). The law's reference coefficients are never a start.
        random_starts: random draws added to the default starts.
        bootstrap_starts: each bootstrap refit starts from this many of the starts (a seeded random
            subset, the same for every refit) and from the full-data optimum; the best result is kept.
        keep_samples: bootstrap draws stored in the fit (for prediction intervals).
        drop_highest_loss: drop this many highest-loss rows first (Besiroglu et al. drop 5).
        min_steps: drop the runs of fewer optimizer steps first (needs a ``steps`` column).
    """
    law = get_law(law)
    if not 0.0 < level < 1.0:
        raise FitError(f"level = {level}: must be in (0, 1), e.g. 0.95")
    if bootstrap < 0 or kfold < 0 or not 0.0 <= heldout_frac < 1.0:
        raise FitError("bootstrap and kfold must be >= 0 and heldout_frac in [0, 1)")
    problem, d, fixed, notes = make_problem(law, data, huber_delta=huber_delta, fix=fix,
                                            points_per_param=points_per_param,
                                            drop_highest_loss=drop_highest_loss, min_steps=min_steps)
    free = problem.free
    starts, cold = fit_starts_and_cold(problem, seed, starts=starts, random_starts=random_starts,
                                       bootstrap_starts=bootstrap_starts)

    rows, held, fold = _weight_rows(d, len(free), heldout_frac=heldout_frac, heldout_by=heldout_by,
                                    kfold=kfold, seed=seed, notes=notes)
    bx, bf, _ = fit_starts(problem, starts, rows)
    if not np.isfinite(bf[0]):
        raise FitError(f"law {law.name}: no start converged to a finite objective; check the data's units")
    nat = law.to_natural(bx)                                  # (rows, n_params)
    params = dict(zip(law.params, map(float, nat[0])))
    pred = law.predict(nat[0], d.cols)
    metrics: dict[str, Any] = {"rmse": _rmse(pred, d.loss), "mae": float(np.mean(np.abs(pred - d.loss))),
                               "huber_objective": float(bf[0]), "n_free": len(free),
                               "heldout_rmse": None, "kfold_rmse": None}
    metrics.update(_heldout_metrics(law, nat, d, held, fold, kfold, heldout_by))
    metrics.update(pooled_seed_sd(d.table))
    if metrics.get("noise_floor"):             # issue 23's yardsticks: errors in units of the seed noise
        metrics["rmse_over_noise_floor"] = metrics["rmse"] / metrics["noise_floor"]
        if metrics["heldout_rmse"] is not None:
            metrics["heldout_rmse_over_noise_floor"] = metrics["heldout_rmse"] / metrics["noise_floor"]
    metrics["max_train_compute"] = max_train_compute(d.table)
    intervals, samples = {}, None
    if bootstrap:
        intervals, samples, metrics["bootstrap_ok"] = _bootstrap_intervals(
            problem, np.vstack([cold, bx[:1]]), bootstrap, seed, level, keep_samples, notes)
        metrics["intervals_at_bounds"] = intervals_at_bounds(law, intervals, free)
    effects = layout_effects(law, params, samples, d.cols, level, metrics.get("noise_floor"))
    if effects is not None:
        effects |= identification(effects, metrics.get("intervals_at_bounds"), [law.params[i] for i in free])
        metrics["layout_effects"] = effects
    notes += _bound_notes(law, bx[0], params, free)
    settings = {"huber_delta": problem.delta, "bootstrap": int(bootstrap), "seed": int(seed),
                "interval_level": level, "kfold": int(kfold), "heldout_frac": float(heldout_frac),
                "heldout_by": heldout_by, "points_per_param": float(points_per_param),
                "n_starts": int(starts.shape[0]), "bootstrap_starts": int(len(cold)),
                "drop_highest_loss": int(drop_highest_loss), "min_steps": int(min_steps),
                "free": [law.params[i] for i in free]}
    return Fit(law=law.name, params=params, intervals=intervals, interval_level=level if bootstrap else None,
               fixed=fixed, samples=samples, metrics=metrics, n_points=d.n, data_hash=d.hash(),
               settings=settings, notes=tuple(notes))


def select_law(data: pd.DataFrame | Mapping[str, Any], candidates: Sequence[str] | None = None,
               **kwargs: Any) -> tuple[Fit, list[dict[str, Any]]]:
    """``--law auto``: fit every candidate (default: the registered laws with ``in_auto`` whose
    inputs the data has), rank by held-out RMSE (the largest-compute runs held out; the k-fold RMSE
    where there is no held-out split), then refit the winner with the bootstrap.

    Returns (the winner's fit, one row per candidate: ``law``, ``heldout_rmse``, ``kfold_rmse``,
    ``rmse``, ``n_free``, or ``skipped`` with the reason). The rows are also in
    ``fit.metrics["candidates"]``."""
    have = set(data.columns if isinstance(data, pd.DataFrame) else data)
    names = list(candidates) if candidates else [n for n, law in LAWS.items() if law.in_auto]
    report, scored = [], []
    for name in names:
        law = get_law(name)
        lacking = [c for c in ("loss", *law.inputs) if c not in have and c not in law.optional_inputs]
        if lacking:
            report.append({"law": name, "skipped": f"no column {', '.join(lacking)}"})
            continue
        try:
            m = fit_law(law, data, **{**kwargs, "bootstrap": 0}).metrics
        except FitError as err:
            report.append({"law": name, "skipped": str(err)})
            continue
        score = m["heldout_rmse"] if m["heldout_rmse"] is not None else m["kfold_rmse"]
        report.append({"law": name, "heldout_rmse": m["heldout_rmse"], "kfold_rmse": m["kfold_rmse"],
                       "rmse": m["rmse"], "n_free": m["n_free"]})
        if score is not None:
            scored.append((score, name))
    if not scored:
        raise FitError("no candidate law could be fitted and scored: "
                       + "; ".join(f"{r['law']}: {r.get('skipped', 'no held-out error')}" for r in report))
    winner = min(scored)[1]
    fit = fit_law(winner, data, **kwargs)
    note = f"law chosen by held-out RMSE among {', '.join(n for _, n in sorted(scored))}"
    fit = dataclasses.replace(fit, metrics={**fit.metrics, "candidates": report}, notes=fit.notes + (note,))
    return fit, report
