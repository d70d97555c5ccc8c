"""Figures of a fitted scaling law against the runs it was fitted on.

Owns the fit helpers (:func:`law_inputs`, :func:`fitted_rows`, :func:`fit_heldout`), the fit
figures (:func:`law_curves`, :func:`predicted_vs_observed`, :func:`residuals`) and the standard set
of a fit and its searches, :func:`fit_figures` (``moe-fit --plot``), which adds the search figures
of :mod:`moe_scaling.plots.search` for each search result given (the dict of
``SearchResult.to_dict()``, the one shape the search figures take).

A ``fit`` is anything with ``predict(X)`` over the law's input columns (a ``laws.fit.Fit``);
bootstrap bands are drawn when it has ``predict_interval``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from moe_scaling.laws.registry import LAW_INPUTS
from moe_scaling.plots.runs import completed, config_line, model_config_from_row, with_costs
from moe_scaling.plots.published import published_models_figure
from moe_scaling.plots.search import (budget_tag, by_compute_dict, by_compute_figure, frontier_figure, iso_loss_contours, optimum_vs_budget,
                                      published_on_scale)
from moe_scaling.plots.style import LOSS_LABEL, WIDE, law_name, legend_right, log_axis, search_dict
from moe_scaling.units import format_count

__all__ = ["law_inputs", "fitted_rows", "fit_heldout", "law_curves", "predicted_vs_observed", "residuals",
           "fit_figures"]


# --------------------------------------------------------------------------------------
# Which rows a fit saw
# --------------------------------------------------------------------------------------


def law_inputs(table: pd.DataFrame | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The canonical law columns (float arrays) of a runs table, as ``Fit.predict`` takes them."""
    return {c: np.asarray(table[c], dtype=np.float64) for c in LAW_INPUTS if c in table}


def _interval(fit: Any, X: Mapping[str, np.ndarray], level: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``fit.predict_interval(X, level, seeds=None)`` as two arrays (the law's own band, without
    the seed noise of a single run), or None when the fit has no bootstrap."""
    fn = getattr(fit, "predict_interval", None)
    if fn is None:
        return None
    try:
        lo, hi = fn(X, level=level, seeds=None)
    except (ValueError, RuntimeError, AttributeError):
        return None
    return np.asarray(lo, float), np.asarray(hi, float)


def fitted_rows(fit: Any, runs: pd.DataFrame, loss: str = "eval_loss") -> pd.DataFrame:
    """The rows of ``runs`` that ``fit`` was fitted on, in order: completed, finite in every column
    the fit reads, and without the ``drop_highest_loss`` highest losses the fit left out (so give
    it the table the fit was given, not an already filtered one)."""
    done = completed(runs, loss)
    law = getattr(fit, "law_obj", None)
    used = [c for c in (*(law.inputs if law is not None else LAW_INPUTS), "tokens", "flops_per_token_forward")
            if c in done]                      # the columns the fit dropped non-finite rows on
    finite = np.logical_and.reduce([np.isfinite(pd.to_numeric(done[c], errors="coerce").to_numpy(float))
                                    for c in (*used, loss)])
    done = done[finite]
    min_steps = int((getattr(fit, "settings", {}) or {}).get("min_steps") or 0)
    if min_steps and "steps" in done:
        done = done[pd.to_numeric(done["steps"], errors="coerce").to_numpy(float) >= min_steps]
    drop = int((getattr(fit, "settings", {}) or {}).get("drop_highest_loss") or 0)
    if drop:
        done = done[done[loss].rank(method="first", ascending=False).to_numpy() > drop]
    return done


def fit_heldout(fit: Any, runs: pd.DataFrame, loss: str = "eval_loss") -> list[str]:
    """Run ids of the runs ``fit`` held out for its ``heldout_rmse``, recomputed with the fit's own
    rule (:func:`moe_scaling.laws.fit.holdout_mask` over its ``heldout_by`` ranking, ``heldout_frac``
    of :func:`fitted_rows`); [] when the fit held nothing out."""
    from moe_scaling.laws.fit import holdout_mask

    settings, metrics = getattr(fit, "settings", {}) or {}, getattr(fit, "metrics", {}) or {}
    if metrics.get("heldout_rmse") is None or "heldout_frac" not in settings:
        return []
    done = fitted_rows(fit, runs, loss)
    by = settings.get("heldout_by", "compute")
    if by != "compute":
        rank = done[by].to_numpy(float)
    elif "flops_per_token_forward" in done and "tokens" in done:
        rank = 3.0 * done["flops_per_token_forward"].to_numpy(float) * done["tokens"].to_numpy(float)
    else:
        rank = 6.0 * done["params_active"].to_numpy(float) * done["tokens"].to_numpy(float)
    return list(done["run_id"][holdout_mask(rank, float(settings["heldout_frac"]))])


def _level(fit: Any, level: float | None) -> float:
    """The interval coverage to draw: as asked, else the fit's own ``interval_level``, else 0.9."""
    return level if level is not None else (getattr(fit, "interval_level", None) or 0.9)


def _heldout_mask(runs: pd.DataFrame, heldout: Sequence[str] | np.ndarray | None) -> np.ndarray:
    if heldout is None:
        return np.zeros(len(runs), bool)
    h = np.asarray(heldout)
    if h.dtype == bool:
        return h
    return runs["run_id"].isin(set(map(str, h))).to_numpy()


# --------------------------------------------------------------------------------------
# Fit figures
# --------------------------------------------------------------------------------------


def law_curves(fit: Any, runs: pd.DataFrame, *, loss: str = "eval_loss", level: float | None = None,
               heldout: Sequence[str] | None = None) -> Figure:
    """The fitted law as curves of predicted loss vs expansion E, one per (granularity, top-k,
    shared) layout of the sweep's MoE runs (dashed: with shared experts), with bootstrap bands at
    ``level``; the runs as points (same colour as their layout's curve; held-out runs ringed in red)
    and dense runs as black crosses.

    Each curve keeps its layout's architecture (the lowest-loss run's trunk, expert width and
    top-k) and training tokens and varies the number of experts, so every law input (active and
    total parameters, embedding, tokens, E, G, shared) is the exact count of a real architecture.
    With several model sizes in the sweep, curves are drawn per size (largest three).
    """
    level = _level(fit, level)
    done = completed(runs, loss)
    costed = with_costs(done)
    moe = costed[~costed["is_dense"]]
    held = _heldout_mask(done, heldout)
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.add_subplot()
    keys = ["d_model", "n_layers", "granularity", "top_k", "n_shared"]
    sizes = moe[["d_model", "n_layers"]].drop_duplicates().sort_values("d_model").tail(3)
    moe = moe.merge(sizes, on=["d_model", "n_layers"])
    groups = list(moe.groupby(keys, sort=True))
    colours = [colormaps["tab10"](i) for i in range(10) if i != 3]   # red marks held-out runs
    multi = len(sizes) > 1
    e_max = max(float(moe["expansion"].max()) * 1.5 if len(moe) else 4.0, 2.0)
    handles, labels = [], []
    for i, (key, grp) in enumerate(groups):
        d, L, g, k, s = key
        base = model_config_from_row(grp.sort_values(loss).iloc[0])
        n = np.geomspace(base.top_k, e_max * base.granularity, 120)   # from "every expert active"
        line = config_line(base, n)
        tokens = float(grp["tokens"].median())
        X = {"params_active": line["params_active"], "params_total": line["params_total"],
             "params_embedding": line["params_embedding"], "tokens": np.full(n.shape, tokens),
             "expansion": n / base.granularity, "granularity": np.full(n.shape, base.granularity),
             "n_shared": np.full(n.shape, float(base.n_shared)), "d_expert": np.full(n.shape, float(base.d_expert))}
        c = colours[i % len(colours)]
        pred = np.asarray(fit.predict(X), float)
        ax.plot(X["expansion"], pred, color=c, linewidth=1.6, linestyle="--" if s else "-",
                zorder=2.5 if s else 2)     # dashed on top: a curve it coincides with shows through
        band = _interval(fit, X, level)
        if band is not None:
            ax.fill_between(X["expansion"], band[0], band[1], color=c, alpha=0.18, linewidth=0)
        ax.scatter(grp["expansion"], grp[loss], color=c, s=36, zorder=3,
                   marker="o" if not s else "s", edgecolors="black", linewidths=0.5)
        size = f"d{int(d)} L{int(L)} " if multi else ""
        handles.append(Line2D([], [], color=c, marker="o" if not s else "s", markeredgecolor="black",
                              markeredgewidth=0.5, linestyle="--" if s else "-"))
        labels.append(f"{size}G = {g:g}, top-{int(k)}" + (f" +{int(s)} shared" if s else ""))
    dense = costed[costed["is_dense"]]
    if len(dense):
        ax.scatter(dense["expansion"], dense[loss], marker="x", color="black", s=45, zorder=4)
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none"))
        labels.append("dense run")
    if held.any():
        hx = done.loc[held, "expansion"].to_numpy(float)
        hy = done.loc[held, loss].to_numpy(float)
        ax.scatter(hx, hy, s=150, facecolors="none", edgecolors="tab:red", linewidths=1.4, zorder=5)
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=11,
                              markerfacecolor="none", markeredgecolor="tab:red"))
        labels.append("held-out run")
    handles.append(Line2D([], [], color="0.5", linewidth=6, alpha=0.3))
    labels.append(f"{level:.0%} bootstrap band")
    legend_right(ax, handles, labels)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("expansion E = n_experts / G (total routed width over d_ff, log scale)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(f"{law_name(fit)}: fitted law vs the runs (each layout at its trunk and tokens)",
                 fontsize="medium")
    ax.grid(True, which="both", alpha=0.2)
    return fig


def _fit_points(fit: Any, runs: pd.DataFrame, loss: str, heldout, level: float):
    done = completed(runs, loss)
    X = law_inputs(done)
    pred = np.asarray(fit.predict(X), float)
    obs = done[loss].to_numpy(float)
    return done, obs, pred, _interval(fit, X, level), _heldout_mask(done, heldout)


def _sets(fit: Any, obs: np.ndarray, pred: np.ndarray, held: np.ndarray):
    """(mask, colour, legend label) for the other runs and the held-out runs. The RMSE is the
    fitted law's on those runs; for the held-out runs also the fit's own ``heldout_rmse`` (the law
    refitted without them)."""
    out = []
    own = (getattr(fit, "metrics", {}) or {}).get("heldout_rmse")
    for mask, colour, name in ((~held, "tab:blue", "runs"), (held, "tab:red", "held-out runs")):
        if mask.any():
            rmse = float(np.sqrt(np.mean((obs[mask] - pred[mask]) ** 2)))
            label = f"{name} (n={int(mask.sum())}): RMSE {rmse:.4f}"
            if mask is held and own is not None:
                label += f"; {own:.4f} predicted by the fit without them"
            out.append((mask, colour, label))
    return out


def predicted_vs_observed(fit: Any, runs: pd.DataFrame, *, heldout: Sequence[str] | None = None,
                          loss: str = "eval_loss", level: float | None = None) -> Figure:
    """Predicted vs observed loss of every completed run, the identity line, the bootstrap interval
    of each prediction as a vertical bar, held-out runs in red; RMSE of each set in the corner."""
    level = _level(fit, level)
    done, obs, pred, band, held = _fit_points(fit, runs, loss, heldout, level)
    fig = Figure(figsize=(5.8, 6.2), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    if band is not None:                       # keep every interval bar inside the axes
        lo, hi = min(lo, np.nanmin(band[0])), max(hi, np.nanmax(band[1]))
    pad = 0.08 * (hi - lo or abs(hi) * 0.01 or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", linestyle="--", linewidth=1.0,
            label="predicted = observed")
    for mask, colour, name in _sets(fit, obs, pred, held):
        yerr = None if band is None else np.abs(np.vstack([pred[mask] - band[0][mask],
                                                            band[1][mask] - pred[mask]]))
        ax.errorbar(obs[mask], pred[mask], yerr=yerr, fmt="o", color=colour, markersize=5,
                    elinewidth=0.8, capsize=2, label=name)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"observed {'eval ' if loss == 'eval_loss' else ''}loss (nats/token)")
    ax.set_ylabel("predicted loss (nats/token)")
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    ax.set_title(f"{law_name(fit)}: predicted vs observed"
                 + (f" (bars: {level:.0%} bootstrap)" if band is not None else ""), fontsize="medium")
    ax.grid(True, alpha=0.3)
    return fig


def residuals(fit: Any, runs: pd.DataFrame, *, heldout: Sequence[str] | None = None,
              loss: str = "eval_loss", x: str = "params_total") -> Figure:
    """Relative residuals ``100 (observed / predicted - 1)`` in % against ``x`` (log axis; default
    total parameters), held-out runs in red, zero line dashed."""
    done, obs, pred, _, held = _fit_points(fit, runs, loss, heldout, 0.9)
    res = 100.0 * (obs / pred - 1.0)
    xs = done[x].to_numpy(float)
    fig = Figure(figsize=(5.8, 5.4), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0.0, color="0.5", linestyle="--", linewidth=1.0)
    for mask, colour, name in _sets(fit, obs, pred, held):
        ax.scatter(xs[mask], res[mask], color=colour, s=30, label=name, zorder=3)
    ax.set_xscale("log")
    names = {"params_total": "total parameters", "params_active": "active parameters",
             "tokens": "training tokens", "expansion": "expansion E"}
    lim = max(np.abs(res).max() * 1.3, 0.1)
    ax.set_ylim(-lim, lim)
    log_axis(ax, "x", format_count)
    ax.set_xlabel(f"{names.get(x, x)} (log scale)")
    ax.set_ylabel("residual: observed / predicted - 1 (%)")
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    ax.set_title(f"{law_name(fit)}: residuals", fontsize="medium")
    ax.grid(True, alpha=0.3)
    return fig




# --------------------------------------------------------------------------------------
# The standard set
# --------------------------------------------------------------------------------------


def fit_figures(fit: Any, *, runs: pd.DataFrame | None = None, results: Sequence[Any] = (),
                heldout: Sequence[str] | None = None, by_compute: Mapping[str, Any] | None = None) -> dict[str, Figure]:
    """The standard figures of a fit and its sweet-spot searches.

    With ``runs`` (the table the law was fitted on: a sweep's runs table, or any table with the
    canonical columns and ``loss``; only :func:`fitted_rows` are drawn): ``predicted_vs_observed``,
    ``residuals`` (``heldout`` run ids highlighted; default :func:`fit_heldout`) and, when the
    table carries model configs, ``law_curves``. For each search result (the dict of
    ``SearchResult.to_dict()`` or ``moe-fit --json``; :func:`moe_scaling.plots.style.search_dict`;
    those without a sweet spot are skipped): ``frontier_memory_<budget>`` and ``iso_loss_<budget>`` (e.g.
    ``frontier_memory_2GB``); for the first also ``frontier_flops_<budget>`` and, when its frontier
    is on their scale, ``published_models``; with two or more budgets, ``optimum_vs_budget``.
    With ``by_compute`` (``ByCompute.to_dict()``, the memory-only answer of ``moe-fit --budget-mem M``):
    ``by_compute_<budget>`` (:func:`moe_scaling.plots.search.by_compute_figure`).
    """
    figs: dict[str, Figure] = {}
    loss = "eval_loss" if runs is not None and "eval_loss" in runs else "loss"
    if runs is not None and not completed(runs, loss).empty:
        if "run_id" not in runs:                 # a plain table (e.g. published runs): name the rows
            runs = runs.assign(run_id=[f"row{i}" for i in range(len(runs))])
        if heldout is None:
            heldout = fit_heldout(fit, runs, loss)
        runs = fitted_rows(fit, runs, loss)      # (not idempotent with drop_highest_loss: once)
        if {"vocab_size", "d_model", "n_layers", "n_heads"} <= set(runs.columns):
            figs["law_curves"] = law_curves(fit, runs, loss=loss, heldout=heldout)
        figs["predicted_vs_observed"] = predicted_vs_observed(fit, runs, heldout=heldout, loss=loss)
        x = next(c for c in ("params_total", "params_active", "tokens", *LAW_INPUTS) if c in runs)
        figs["residuals"] = residuals(fit, runs, heldout=heldout, loss=loss, x=x)
    rs = [search_dict(r) for r in results if r]
    rs = [r for r in rs if r.get("sweet_spot")]
    for i, r in enumerate(rs):
        tag = budget_tag(r)
        figs[f"frontier_memory_{tag}"] = frontier_figure(r)
        if i == 0:
            figs[f"frontier_flops_{tag}"] = frontier_figure(r, axis="flops")
            if published_on_scale(r):
                figs["published_models"] = published_models_figure(r)
        figs[f"iso_loss_{tag}"] = iso_loss_contours(fit, r)
    if len(rs) >= 2:
        figs["optimum_vs_budget"] = optimum_vs_budget(rs)
    if by_compute is not None:
        bc = by_compute_dict(by_compute)
        figs[f"by_compute_{budget_tag(bc)}"] = by_compute_figure(bc)
    return figs
