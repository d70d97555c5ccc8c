"""Statistics of runs and draws that fits and tests lean on: the seed-to-seed noise floor of a runs
table (:func:`pooled_seed_sd`), the largest training compute it holds under each compute rule
(:func:`max_train_compute`), the Monte Carlo error of a percentile of random draws
(:func:`percentile_mc_se`) and the quantiles of a mixture of normals (:func:`mixture_quantile`, the
new-run prediction interval of :meth:`moe_scaling.laws.fit.Fit.predict_interval`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from moe_scaling.laws.errors import FitError
from moe_scaling.laws.registry import CANONICAL_COLUMNS

__all__ = ["STEP_REGIMES", "MIN_FAMILY_DOF", "noise_family", "pooled_seed_sd", "max_train_compute",
           "percentile_mc_se", "mixture_quantile"]


def percentile_mc_se(draws: np.ndarray, q: float) -> float:
    """Monte Carlo standard error of the ``q``-th percentile (0-100) of ``draws`` (one axis).

    A percentile of ``n`` draws is itself random: rerun with other draws (another seed, or the
    same seed on a CPU whose last bits differ) and it moves. Distribution-free, by order statistics:
    the number of draws below the true p-quantile (``p = q / 100``) is Binomial(n, p), so the
    order statistics of ranks ``n p -+ z sqrt(n p (1 - p))`` (``z = 1.96``) bracket the quantile
    with ~95% confidence, and

        se = (x_(k) - x_(j)) / (2 z),   j = floor(n p - z sqrt(n p (1-p))),  k = ceil(n p + z sqrt(n p (1-p)))

    (0-based ranks). For a normal sample this tends to the textbook ``sqrt(p (1 - p) / n) / phi(z_p)``
    times its sd; it shrinks as ``1 / sqrt(n)``. It is itself an estimate from one sample: over 400
    samples of normal draws its mean was 1.04-1.06x the true spread at n = 1,000 (2.5th, 50th, 97.5th
    percentiles) and 1.5x at n = 200 (2.5th), and single samples scatter around that. When the ranks
    run past the sample (too few draws in that tail to bracket the quantile) it returns ``inf``: the
    percentile's error is then unknown, not small."""
    x = np.sort(np.asarray(draws, float).ravel())
    n = x.size
    if n < 2:
        raise FitError(f"a percentile's Monte Carlo error needs at least 2 draws, got {n}")
    p, z = q / 100.0, 1.96
    half = z * np.sqrt(n * p * (1.0 - p))
    j, k = int(np.floor(n * p - half)), int(np.ceil(n * p + half))
    if j < 0 or k > n - 1:
        return math.inf
    return float((x[k] - x[j]) / (2.0 * z))


def mixture_quantile(centres: np.ndarray, sd: float | np.ndarray, q: float, iters: int = 60) -> np.ndarray:
    """The ``q`` quantile, per column, of an equal mixture of normals ``N(centres[s, j], sd_j^2)`` over
    the finite rows ``s`` (``sd`` one value, or one per column): bisection on the mixture CDF, 60 halvings of a bracket 8 sd wide beyond
    the centres (to ~1e-17 of it). NaN where a column has no finite centre."""
    from scipy.special import ndtr

    c = np.asarray(centres, np.float64)
    sd = np.asarray(sd, np.float64)
    ok = np.isfinite(c)
    n = ok.sum(axis=0)
    lo = np.where(ok, c, np.inf).min(axis=0) - 8 * sd
    hi = np.where(ok, c, -np.inf).max(axis=0) + 8 * sd
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cdf = np.where(ok, ndtr((mid - np.where(ok, c, 0.0)) / sd), 0.0).sum(axis=0) / np.maximum(n, 1)
        lo, hi = np.where(cdf < q, mid, lo), np.where(cdf < q, hi, mid)
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def max_train_compute(table: pd.DataFrame) -> dict[str, float]:
    """The largest training compute among the fitted runs under each rule a budget may use
    (:data:`moe_scaling.design.space.COMPUTE_RULES`), where the table has the columns for it:
    ``6N`` = 6 x non-embedding active parameters x tokens, ``3x-forward`` = 3 x forward FLOPs per
    token x tokens. A budget's extrapolation is its compute over the entry of its own rule."""
    out = {}
    cols = table.columns
    if {"params_active", "tokens"} <= set(cols):
        emb = table["params_embedding"] if "params_embedding" in cols else 0.0
        out["6N"] = float((6.0 * (table["params_active"] - emb) * table["tokens"]).max())
    if {"flops_per_token_forward", "tokens"} <= set(cols):
        out["3x-forward"] = float((3.0 * table["flops_per_token_forward"] * table["tokens"]).max())
    return out


def _config_columns() -> frozenset[str]:
    """Every configuration field a runs table may carry (ModelConfig, TrainConfig, DataConfig) and
    the canonical columns; the corpus is compared by ``corpus_hash`` where the table has it."""
    from moe_scaling.config import DataConfig, ModelConfig, TrainConfig

    names = {f.name for cls in (ModelConfig, TrainConfig, DataConfig) for f in dataclasses.fields(cls)}
    return frozenset(names | set(CANONICAL_COLUMNS) | {"corpus_hash", "steps"}) - {"seed", "loss"}


STEP_REGIMES = (0, 1000, 3000, 10000, math.inf)
"""Edges of the optimizer-step regimes the noise floor is also pooled in (lower edge included)."""


MIN_FAMILY_DOF = 10
"""Degrees of freedom a MoE layout family's floor needs before a new run of it uses that floor
rather than every MoE run's: the sd of a pooled sd is about ``sigma / sqrt(2 dof)``, 22% at 10."""


def noise_family(expansion: float, shared: bool) -> str:
    """The family whose runs share a seed-to-seed noise floor: "dense" (``expansion`` <= 1: every
    expert active), else "moe x<expansion>", with " + shared" when a shared expert is active."""
    if expansion <= 1.0:
        return "dense"
    return f"moe x{expansion:g}" + (" + shared" if shared else "")


def pooled_seed_sd(table: pd.DataFrame) -> dict[str, Any]:
    """The seed-to-seed noise of a runs table with a ``seed`` column: runs equal in every
    configuration column the table has (:func:`_config_columns`: every config field and canonical
    column but the seed; the corpus by its content hash where the table has one) are repeats of one
    configuration, duplicate (configuration, seed) rows count once, and the pooled sd is

        sigma = sqrt( sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1) )

    over the configurations ``i`` with ``n_i >= 2`` seeds (``s_i`` their sd, ddof 1): every repeat
    contributes its degrees of freedom, not one 2-dof sd per configuration. Without a seed column
    (e.g. published run data) nothing says which rows repeat: None. Returns ``{"noise_floor": sigma
    or None, "noise_floor_dof": sum(n_i - 1), "noise_floor_configs": count, "noise_floor_steps":
    [min, max] optimizer steps of the repeats, "noise_floor_by_steps": the same pooled sd within each
    step regime of :data:`STEP_REGIMES` that has repeats ([{"steps": [lo, hi or None], "configs",
    "dof", "noise_floor"}]: short runs end noisier), where the table has steps, "noise_floor_by_family":
    the same for dense runs (``expansion`` 1: every expert active), for every MoE run, and for the MoE
    runs of each expansion with and without a shared expert ([{"family": :func:`noise_family` ("dense",
    "moe x4", "moe x4 + shared", ...) or "moe" (every MoE run), "configs", "dof", "noise_floor"}]:
    routing amplifies a new seed, so MoE runs can scatter several times more, the more experts the
    more), where the table has an expansion column}``."""
    none = {"noise_floor": None, "noise_floor_dof": 0, "noise_floor_configs": 0, "noise_floor_steps": None,
            "noise_floor_by_steps": None, "noise_floor_by_family": None}
    if "seed" not in table.columns or len(table) < 2:
        return none
    keys = [c for c in table.columns if c in _config_columns()
            and not (c == "corpus" and "corpus_hash" in table.columns)]
    t = table.drop_duplicates(subset=keys + ["seed"])
    g = t.groupby([t[k].astype(str) for k in keys], dropna=False)
    n, var = g["loss"].count(), g["loss"].var(ddof=1)
    rep = n >= 2
    if not int((n[rep] - 1).sum()):
        return none

    def pooled(inside: pd.Series) -> dict[str, Any] | None:
        """The pooled sd over the repeated configurations where ``inside`` holds (None if none)."""
        k = int((n[rep][inside] - 1).sum())
        return {"configs": int(inside.sum()), "dof": k, "noise_floor": float(math.sqrt(
            ((n[rep][inside] - 1) * var[rep][inside]).sum() / k))} if k else None

    every = pooled(rep[rep])
    steps, by_steps, by_family = None, None, None
    if "steps" in t.columns:
        first = g["steps"].min()[rep]                       # a configuration's repeats share their steps
        steps = [int(first.min()), int(first.max())]
        by_steps = [{"steps": [lo, None if math.isinf(hi) else hi], **b}
                    for lo, hi in zip(STEP_REGIMES[:-1], STEP_REGIMES[1:])
                    if (b := pooled((first >= lo) & (first < hi)))]
    if "expansion" in t.columns:
        expansion = g["expansion"].first()[rep].astype(float)
        shared = (g["n_shared"].first()[rep].astype(float) > 0 if "n_shared" in t.columns
                  else pd.Series(False, index=expansion.index))
        names = pd.Series([noise_family(e, s) for e, s in zip(expansion, shared)], index=expansion.index)
        dense = names == "dense"
        layouts = sorted({(e, s) for e, s in zip(expansion[~dense], shared[~dense])})  # by expansion, unshared first
        groups = [("dense", dense), ("moe", ~dense)] + [(name, names == name)
                                                        for name in dict.fromkeys(noise_family(e, s) for e, s in layouts)]
        by_family = [{"family": name, **b} for name, inside in groups if (b := pooled(inside))]
    return {"noise_floor": every["noise_floor"], "noise_floor_dof": every["dof"],
            "noise_floor_configs": every["configs"], "noise_floor_steps": steps,
            "noise_floor_by_steps": by_steps, "noise_floor_by_family": by_family}
