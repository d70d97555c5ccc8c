"""Figures of a sweet-spot search (:mod:`moe_scaling.design.search`): predicted frontiers and optima.

Owns :func:`frontier_figure` (predicted loss vs memory or FLOPs per token), :func:`optimum_vs_budget`
(the sweet spot across budgets), :func:`by_compute_figure` (the memory-only answer: best MoE and
best dense across training-compute budgets), :func:`iso_loss_grid` and :func:`iso_loss_contours`
(the law over expansion and granularity at the sweet spot), and the search helpers
:func:`arch_label`, :func:`budget_tag`, :func:`by_compute_dict` and :func:`published_on_scale`.

One input shape: every function here takes a search result as the dict that
``SearchResult.to_dict()`` returns, which is also what ``moe-fit ... --json`` prints (extra keys
of that output are ignored), so a saved result and a live one draw the same figure. A caller
holding a ``SearchResult`` calls ``.to_dict()`` first; passing the object is a TypeError
(:func:`moe_scaling.plots.style.search_dict`). Likewise :func:`by_compute_figure` takes
``ByCompute.to_dict()`` (the ``by_compute`` value of ``moe-fit --budget-mem M --json``, or that
whole output).

The figures use the search's own axes: memory on device is weights plus the KV cache at the
budget's precisions and context, FLOPs are forward FLOPs per token at that context.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from moe_scaling.plots.runs import config_line, model_config_from_row
from moe_scaling.plots.style import (BYTE_UNITS, COUNT_UNITS, FLOP_UNITS, axis_unit, budget_note,
                                     label_points, law_name, log_axis, memory_axis_label, search_dict)
from moe_scaling.units import format_bytes, format_count, format_flops

__all__ = ["frontier_figure", "optimum_vs_budget", "by_compute_figure", "iso_loss_grid", "iso_loss_contours",
           "arch_label", "budget_tag", "by_compute_dict", "published_on_scale"]


# --------------------------------------------------------------------------------------
# Helpers: what a result holds, as text and marks
# --------------------------------------------------------------------------------------


def published_on_scale(r: Mapping[str, Any], xkey: str = "total_bytes") -> list[dict[str, Any]]:
    """The search's published models within 30x of its frontier's cost range on ``xkey`` (a
    frontier of kilobyte models and a 5 GB model share no useful axis)."""
    xs = [p[xkey] for p in r.get("frontier") or []]
    if not xs:
        return []
    return [p for p in r.get("published") or [] if min(xs) / 30 <= p[xkey] <= max(xs) * 30]


def arch_label(d: Mapping[str, Any]) -> str:
    """``0.92B active / 5.33B total, E 7.5 G 8 +1 shared`` (or ``dense``) of a described config."""
    size = f"{format_count(d['params_active'])} active / {format_count(d['params_total'])} total"
    if d.get("n_experts", 1) <= 1:
        return f"dense {size}"
    shared = f" +{d['n_shared']} shared" if d.get("n_shared") else ""
    return f"{size}, E {d['expansion']:.3g} G {d['granularity']:g}{shared}"


def _loss_text(d: Mapping[str, Any]) -> str:
    """``2.315 [2.301, 2.330]``: a predicted loss and its interval when it has one."""
    iv = d.get("predicted_loss_interval")
    return f"{d['predicted_loss']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")


def _point_with_interval(ax, d: Mapping[str, Any], x: float, **style) -> None:
    """One described model at ``(x, predicted loss)`` with its interval as an error bar."""
    iv = d.get("predicted_loss_interval")
    yerr = None if not iv else [[d["predicted_loss"] - iv[0]], [iv[1] - d["predicted_loss"]]]
    ax.errorbar([x], [d["predicted_loss"]], yerr=yerr, capsize=3, elinewidth=1.0, zorder=5, **style)


def budget_tag(r: Mapping[str, Any]) -> str:
    """The memory budget as a file-name tag: ``2GB``, ``500KB``."""
    return format_bytes(r["budget"]["memory"]).replace(" ", "")


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _zoomed(front: pd.DataFrame, xkey: str, anchor: float | None, zoom: float | None) -> pd.DataFrame:
    """The rows of ``front`` costing at least ``anchor / zoom`` on ``xkey`` (all without a zoom or anchor)."""
    if zoom and anchor and len(front):
        return front[front[xkey] >= anchor / zoom]
    return front


def _draw_frontiers(fig: Figure, ax, r: Mapping[str, Any], front: pd.DataFrame, xkey: str, scale: float,
                    dense_anchor: float | None, zoom: float | None, handles: list, labels: list) -> None:
    """The predicted frontier coloured by expansion (with its colour bar) and, on the memory axis,
    the dense-only frontier dashed."""
    from matplotlib.colors import LogNorm

    if len(front):
        fx = front[xkey].to_numpy(float) / scale
        ax.plot(fx, front["predicted_loss"], color="0.3", linewidth=1.2, zorder=2)
        e_hi = max(2.0, float(front["expansion"].max()))
        sc = ax.scatter(fx, front["predicted_loss"], c=front["expansion"].astype(float), cmap="viridis",
                        norm=LogNorm(vmin=1.0, vmax=e_hi), s=26, zorder=3, edgecolors="none")
        cb = fig.colorbar(sc, ax=ax, label="expansion E of the frontier model", pad=0.01)
        cb.set_ticks([t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= e_hi])
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
        handles.append(Line2D([], [], color="0.3", marker="o", markersize=5))
        labels.append("predicted frontier (any architecture)")
    if xkey == "total_bytes" and r.get("frontier_dense"):
        dense = _zoomed(pd.DataFrame(r["frontier_dense"]), xkey, dense_anchor, zoom)
        ax.plot(dense[xkey] / scale, dense["predicted_loss"], color="black", linestyle="--", linewidth=1.2)
        handles.append(Line2D([], [], color="black", linestyle="--"))
        labels.append("predicted frontier (dense only)")


def _draw_optima(ax, r: Mapping[str, Any], pub: list[dict[str, Any]], xkey: str, scale: float,
                 handles: list, labels: list) -> None:
    """The best dense model (black square) and the sweet spot (red star) with their intervals, and
    the published models (grey diamonds) at their predicted loss."""
    s, d = r.get("sweet_spot"), r.get("dense")
    if d:
        _point_with_interval(ax, d, d[xkey] / scale, fmt="s", color="black", markersize=7)
        handles.append(Line2D([], [], linestyle="none", marker="s", color="black", markersize=7))
        labels.append(f"best dense: {arch_label(d)}; loss {_loss_text(d)}")
    if s:
        _point_with_interval(ax, s, s[xkey] / scale, fmt="*", color="tab:red", markersize=15,
                             markeredgecolor="black", markeredgewidth=0.6)
        handles.append(Line2D([], [], linestyle="none", marker="*", color="tab:red", markersize=13,
                              markeredgecolor="black", markeredgewidth=0.6))
        labels.append(f"sweet spot: {arch_label(s)}; loss {_loss_text(s)}")
    if pub:
        ax.scatter([p[xkey] / scale for p in pub], [p["predicted_loss"] for p in pub], marker="D",
                   color="0.55", edgecolors="black", linewidths=0.5, s=34, zorder=4)
        handles.append(Line2D([], [], linestyle="none", marker="D", color="0.55", markeredgecolor="black",
                              markeredgewidth=0.5))
        labels.append("published model (the law's prediction for it)")


def frontier_figure(result: Mapping[str, Any], *, axis: str = "memory", published: bool = True,
                    zoom: float | None = 10.0) -> Figure:
    """The predicted Pareto frontier of one search: predicted loss vs memory on device (or vs
    forward FLOPs per token with ``axis="flops"``), frontier models coloured by expansion, the
    dense frontier dashed, the budget as a vertical line (beyond it shaded), the sweet spot (red
    star) and best dense model (black square) with their bootstrap intervals, and the published
    models (grey diamonds, labelled) at their predicted loss under the same law and tokens.

    ``zoom``: frontier points cheaper than ``budget / zoom`` are left out (the law's far
    extrapolation to tiny models would set the loss axis); None shows the whole frontier."""
    r = search_dict(result)
    b = r["budget"]
    memory = axis == "memory"
    if axis not in ("memory", "flops"):
        raise ValueError(f"axis = {axis!r}: use memory or flops")
    xkey = "total_bytes" if memory else "flops_per_token_forward"
    limit = b["memory"] if memory else b.get("flops_per_token")
    front = _zoomed(pd.DataFrame(r["frontier"] if memory else r["frontier_flops"]), xkey,
                    limit if limit else (r.get("sweet_spot") or {}).get(xkey), zoom)
    span = (list(front[xkey]) if len(front) else []) + ([limit] if limit else [])
    unit, scale = axis_unit(span or [1.0], units=BYTE_UNITS if memory else FLOP_UNITS)
    pub = published_on_scale(r, xkey) if published else []
    fig = Figure(figsize=(8.4, 6.2), layout="constrained")
    ax = fig.add_subplot()
    handles, labels = [], []
    _draw_frontiers(fig, ax, r, front, xkey, scale, limit, zoom, handles, labels)
    _draw_optima(ax, r, pub, xkey, scale, handles, labels)
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * (3.0 if pub else 1.0))    # room for the labels right of the points
    if limit:
        ax.axvline(limit / scale, color="tab:red", linestyle=":", linewidth=1.2)
        ax.axvspan(limit / scale, ax.get_xlim()[1], color="0.5", alpha=0.08, linewidth=0)
        handles.append(Line2D([], [], color="tab:red", linestyle=":"))
        labels.append(f"budget: {format_bytes(limit) if memory else format_flops(limit) + ' per token'}"
                      " (shaded: over)")
    log_axis(ax, "x")
    ax.set_xlabel(memory_axis_label(b, unit) if memory
                  else f"forward {unit} per token at {b['context']} tokens (log scale)")
    ax.set_ylabel("predicted loss (nats/token)")
    fig.legend(handles, labels, loc="outside lower center", fontsize="small", ncols=1, frameon=False)
    ax.set_title(f"Predicted loss vs {'memory' if memory else 'compute'}\n({budget_note(b)})",
                 fontsize="medium")
    ax.grid(True, which="both", alpha=0.2)
    if pub:
        label_points(ax, [p[xkey] / scale for p in pub], [p["predicted_loss"] for p in pub],
                     [p["name"] for p in pub], fontsize="x-small", color="0.25",
                     avoid=(front[xkey] / scale, front["predicted_loss"]) if len(front) else ((), ()))
    return fig


def optimum_vs_budget(results: Sequence[Mapping[str, Any]]) -> Figure:
    """The sweet spot as a function of the memory budget: predicted loss of the sweet spot and of
    the best dense model with their bootstrap bands (top), and their active and total parameters
    (bottom); each sweet spot is labelled with its expansion and granularity."""
    rs = sorted((search_dict(r) for r in results), key=lambda r: r["budget"]["memory"])
    rs = [r for r in rs if r.get("sweet_spot")]
    if not rs:
        raise ValueError("no search result has a sweet spot (every budget infeasible?)")
    unit, scale = axis_unit([r["budget"]["memory"] for r in rs])
    x = np.array([r["budget"]["memory"] for r in rs], float) / scale
    pname, pscale = axis_unit([r["sweet_spot"]["params_total"] for r in rs], units=COUNT_UNITS)
    fig = Figure(figsize=(7.0, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for key, colour, style, name in (("sweet_spot", "tab:red", "-", "sweet spot (MoE or dense)"),
                                     ("dense", "black", "--", "best dense model")):
        pts = [r.get(key) for r in rs]
        keep = np.array([p is not None for p in pts])
        if not keep.any():
            continue
        pts = [p for p in pts if p is not None]
        xs = x[keep]
        y = np.array([p["predicted_loss"] for p in pts])
        top.plot(xs, y, style, color=colour, marker="o", markersize=5, label=name)
        ivs = [p.get("predicted_loss_interval") for p in pts]
        if all(ivs):
            iv = np.array(ivs)
            top.fill_between(xs, iv[:, 0], iv[:, 1], color=colour, alpha=0.15, linewidth=0)
        bottom.plot(xs, [p["params_total"] / pscale for p in pts], style, color=colour, marker="o",
                    markersize=5, label=f"{name.split(' (')[0]}: total")
        bottom.plot(xs, [p["params_active"] / pscale for p in pts], style, color=colour, marker="^",
                    markersize=5, alpha=0.6, label=f"{name.split(' (')[0]}: active")
        if key == "sweet_spot":
            for xi, p in zip(xs, pts):
                text = "dense" if p["n_experts"] <= 1 else f"E {p['expansion']:.3g}, G {p['granularity']:g}"
                top.annotate(text, (xi, p["predicted_loss"]), xytext=(0, 9), textcoords="offset points",
                             ha="center", fontsize="x-small", color="tab:red")
    ylo, yhi = top.get_ylim()
    top.set_ylim(ylo, yhi + 0.12 * (yhi - ylo))         # room for the labels above the points
    top.set_ylabel("predicted loss (nats/token)")
    top.legend(loc="upper right", fontsize="small")
    top.set_title(f"Sweet spot vs memory budget\n({budget_note(rs[0]['budget'])}"
                  + ("; bands: bootstrap interval" if rs[0]["sweet_spot"].get("predicted_loss_interval") else "")
                  + ")", fontsize="medium")
    bottom.set_yscale("log")
    bottom.set_ylabel(f"parameters ({pname + ', ' if pname else ''}log)")
    bottom.legend(loc="upper left", fontsize="x-small", ncols=2)
    bottom.set_xscale("log")
    lo, hi = bottom.get_xlim()
    bottom.set_xlim(lo / 1.1, hi * 1.1)
    bottom.set_xticks(x)                           # a tick at every budget searched
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bottom.xaxis.set_minor_formatter(NullFormatter())
    log_axis(bottom, "y")
    bottom.set_xlabel(memory_axis_label(rs[0]["budget"], unit, "memory budget"))
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.2)
    return fig


def by_compute_dict(result: Any) -> Mapping[str, Any]:
    """``result`` when it is the dict of ``ByCompute.to_dict()`` (:func:`moe_scaling.design.search.
    search_by_compute`), or the ``by_compute`` value of a ``moe-fit --budget-mem M --json`` output
    given whole. The ``ByCompute`` object itself is a TypeError (call ``.to_dict()``)."""
    if isinstance(result, Mapping) and isinstance(result.get("by_compute"), Mapping):
        result = result["by_compute"]
    r = search_dict(result)
    if "rows" not in r:
        raise ValueError("not a by-compute result: no 'rows' key (give ByCompute.to_dict() or the "
                         "moe-fit --budget-mem M --json output without --tokens / --train-compute)")
    if not r["rows"]:
        raise ValueError("the by-compute result has no rows")
    return r


def _takeover(r: Mapping[str, Any]) -> float | None:
    """Where dense takes over in a by-compute result: the compute where the best MoE and best dense
    predictions cross (``crossover``) when known, else the smallest listed budget from which dense
    is the sweet spot (``dense_takes_over``); None when MoE wins at the largest budget."""
    return r.get("crossover") or r.get("dense_takes_over")


def by_compute_figure(result: Mapping[str, Any]) -> Figure:
    """The memory-only answer (:func:`moe_scaling.design.search.search_by_compute`): across
    training-compute budgets (log x), the predicted loss of the best MoE (red) and of the best dense
    model (black, dashed) under the same memory budget, with their bootstrap bands where the fit has
    them (top); the MoE advantage, best dense minus best MoE, in nats/token (bottom, point
    predictions). A vertical dotted line marks where dense takes over (``crossover``, else ``dense_takes_over``), the
    region beyond it shaded; each listed budget's sweet spot is ringed."""
    r = by_compute_dict(result)
    b, rows = r["budget"], sorted(r["rows"], key=lambda row: row["train_compute"])
    C = np.array([row["train_compute"] for row in rows], float)
    fig = Figure(figsize=(7.2, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    banded = False
    for key, colour, style, name in (("best_moe", "tab:red", "-", "best MoE"), ("dense", "black", "--", "best dense")):
        keep = np.array([row.get(key) is not None for row in rows])
        if not keep.any():
            continue
        pts = [row[key] for row in rows if row.get(key) is not None]
        top.plot(C[keep], [p["predicted_loss"] for p in pts], style, color=colour, marker="o", markersize=5,
                 label=name)
        ivs = [p.get("predicted_loss_interval") for p in pts]
        if all(ivs):
            iv = np.array(ivs, float)
            top.fill_between(C[keep], iv[:, 0], iv[:, 1], color=colour, alpha=0.15, linewidth=0)
            banded = True
    top.scatter(C, [row["predicted_loss"] for row in rows], s=130, facecolors="none", edgecolors="tab:blue",
                linewidths=1.2, zorder=4, label="sweet spot at that compute")
    adv = [(c, row["moe_advantage"]) for c, row in zip(C, rows) if row.get("moe_advantage") is not None]
    if adv:
        ax_, ay_ = np.array(adv).T
        bottom.plot(ax_, ay_, "-", color="tab:red", marker="o", markersize=5)
    bottom.axhline(0.0, color="0.4", linewidth=0.8)
    over = _takeover(r)
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.2)
    lo, hi = C[0] / 2.0, C[-1] * 2.0
    bottom.set_xlim(lo, hi)
    handles, labels = top.get_legend_handles_labels()
    if over is not None:
        for ax in (top, bottom):
            ax.axvline(over, color="tab:blue", linestyle=":", linewidth=1.4)
            ax.axvspan(over, hi, color="0.5", alpha=0.08, linewidth=0)
        handles.append(Line2D([], [], color="tab:blue", linestyle=":"))
        labels.append(f"dense takes over: {over:.2g} FLOPs (predictions cross)" if r.get("crossover") else
                      f"dense is the sweet spot from {over:.2g} FLOPs on")
    top.set_ylabel("predicted loss (nats/token)")
    top.legend(handles, labels, loc="upper right", fontsize="small")
    bottom.set_ylabel("MoE advantage\n(dense - MoE, nats/token)")
    bottom.set_xticks(C)
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+", "e")))
    bottom.xaxis.set_minor_formatter(NullFormatter())
    rule = "6 N_active" if b.get("compute_rule") == "6N" else "(3 x forward FLOPs/token)"
    bottom.set_xlabel(f"training compute C (FLOPs, log scale); tokens = C / {rule}")
    verdict = "" if over is not None else "; MoE is the sweet spot at the largest budget listed"
    top.set_title(f"Sweet spot by training compute under {format_bytes(b['memory'])}\n(weights "
                  f"{b['weights'].upper()} + KV cache {b['kv'].upper()} at {b['context']} tokens"
                  + ("; bands: bootstrap interval" if banded else "") + verdict + ")", fontsize="medium")
    return fig


def iso_loss_grid(fit: Any, result: Mapping[str, Any], *, expansion_max: float = 64.0,
                  granularities: Sequence[int] | None = None, points: int = 90,
                  expansions: Sequence[float] | None = None) -> dict[str, Any]:
    """Predicted loss and memory over (expansion E, granularity G) at a search's sweet spot.

    The plane keeps the sweet spot's trunk (d_model, layers, attention, shared experts), its active
    FFN width and the search's training tokens. Each G has ``top_k = top_k0 * G / G0`` experts of
    width ``d_ff / G`` (``granularities`` default: the search space's, else 1-32; G values giving
    a fractional top-k or width are left out); E runs over
    ``points`` log-spaced values from 1 to ``max(expansion_max, 2 x the sweet spot's E)`` (or
    over ``expansions`` when given), with the
    exact counts of ``n_experts = E * G`` experts (affine in n_experts), so only the router moves
    the active count. Points with fewer than top-k experts are NaN.

    Returns ``E`` [nE], ``G`` [nG], ``loss`` and ``memory`` (weights at the budget's precision +
    the sweet spot's KV cache, bytes) [nG, nE], ``base`` (the sweet spot's ModelConfig),
    ``sweet_spot`` and ``budget`` (dicts).
    """
    r = search_dict(result)
    s, b = r.get("sweet_spot"), r["budget"]
    if not s:
        raise ValueError("the search found no sweet spot; nothing to centre the contours on")
    base = model_config_from_row(s)
    g0, k0 = base.granularity, base.top_k
    tokens = float(s["tokens"])
    if granularities is None:
        granularities = sorted((r.get("space") or {}).get("granularities") or (1, 2, 4, 8, 16, 32))
    rows = []
    for g in granularities:
        k = k0 * g / g0
        width = base.d_ff / g
        if k < 1 or not float(k).is_integer() or not float(width).is_integer() or width < 8:
            continue
        rows.append(dataclasses.replace(base, top_k=int(k), d_expert=int(width), n_experts=int(k) + 1))
    E = (np.asarray(expansions, float) if expansions is not None
         else np.geomspace(1.0, max(expansion_max, 2.0 * float(s["expansion"])), points))
    G = np.array([c.d_ff / c.d_expert for c in rows])
    Z = np.full((len(rows), len(E)), np.nan)
    M = np.full_like(Z, np.nan)
    for i, cfg in enumerate(rows):
        n = E * G[i]
        line = config_line(cfg, n, b["weights"])
        X = {"params_active": line["params_active"], "params_total": line["params_total"],
             "params_embedding": line["params_embedding"], "tokens": np.full(n.shape, tokens),
             "expansion": E, "granularity": np.full(n.shape, G[i]),
             "n_shared": np.full(n.shape, float(cfg.n_shared)), "d_expert": np.full(n.shape, float(cfg.d_expert))}
        ok = n >= cfg.top_k * (1 - 1e-9)       # at least top_k experts (E * G >= top_k)
        Z[i] = np.where(ok, np.asarray(fit.predict(X), float), np.nan)
        M[i] = np.where(ok, line["weight_bytes"] + float(s["kv_cache_bytes"]), np.nan)
    return {"E": E, "G": G, "loss": Z, "memory": M, "base": base, "sweet_spot": s, "budget": b}


def iso_loss_contours(fit: Any, result: Mapping[str, Any], *, expansion_max: float = 64.0,
                      granularities: Sequence[int] | None = None, levels: int = 10) -> Figure:
    """Iso-loss contours of ``fit`` over (expansion E, granularity G) at the sweet spot's trunk and
    active size and the search's training tokens (:func:`iso_loss_grid`); the sweet spot is the
    red star and the memory budget (weights + KV cache) the dashed line, hatched beyond."""
    from moe_scaling.design.search import law_reads

    grid = iso_loss_grid(fit, result, expansion_max=expansion_max, granularities=granularities)
    E, G, Z, M, base, s, b = (grid[k] for k in ("E", "G", "loss", "memory", "base", "sweet_spot", "budget"))
    tokens = float(s["tokens"])
    fig = Figure(figsize=(7.6, 5.0), layout="constrained")
    ax = fig.add_subplot()
    cf = ax.contourf(E, G, Z, levels=levels, cmap="viridis_r")
    cs = ax.contour(E, G, Z, levels=cf.levels, colors="black", linewidths=0.5, alpha=0.6)
    ax.clabel(cs, cs.levels[::2], fontsize="small", fmt="%.3f")
    fig.colorbar(cf, ax=ax, label="predicted loss (nats/token)", pad=0.01)
    handles, labels = [], []
    if np.nanmax(M) > b["memory"] > np.nanmin(M):
        ax.contour(E, G, M, levels=[b["memory"]], colors="white", linewidths=1.8, linestyles="--")
        over = ax.contourf(E, G, M, levels=[b["memory"], np.nanmax(M) * 2], colors="none", hatches=["//"])
        over.set_hatchcolor((1.0, 1.0, 1.0, 0.55))     # light enough to read the colours through
        over.set_hatch_linewidth(0.6)
        handles.append(Line2D([], [], color="white", linestyle="--", linewidth=1.8))
        labels.append(f"memory budget {format_bytes(b['memory'])} (hatched: over)")
    ax.scatter([s["expansion"]], [s["granularity"]], marker="*", s=260, color="tab:red",
               edgecolors="black", linewidths=0.7, zorder=5)
    handles.append(Line2D([], [], linestyle="none", marker="*", markersize=14, color="tab:red",
                          markeredgecolor="black"))
    labels.append(f"sweet spot: E {s['expansion']:.3g}, G {s['granularity']:g}")
    leg = fig.legend(handles, labels, loc="outside lower center", fontsize="small", ncols=2, frameon=False)
    for h in leg.legend_handles:
        if isinstance(h, Line2D) and h.get_color() == "white":
            h.set_color("0.2")                     # the white budget line, visible on white paper
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yticks(G)
    ax.set_xlim(E[0] / 1.1, E[-1] * 1.05)          # margins keep a corner sweet spot visible
    ax.set_ylim(G.min() / 1.15, G.max() * 1.15)
    ax.set_xlabel("expansion E = n_experts / G (log scale)")
    ax.set_ylabel("granularity G = d_ff / d_expert (log scale)")
    reads = law_reads(fit)
    blind = [k for k in ("granularity",) if not reads.get(k, True)]
    shared = f", {base.n_shared} shared" if base.n_shared else ""
    ax.set_title(f"{law_name(fit)}: iso-loss at d_model {base.d_model} x {base.n_layers} layers{shared}, "
                 f"~{format_count(s['params_active'])} active, {format_count(tokens)} tokens"
                 + ("\n(this law does not read granularity: contours are vertical)" if blind else ""),
                 fontsize="medium")
    return fig
