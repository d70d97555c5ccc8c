"""The isoFLOP figure of a study that trains several model sizes at each training-compute budget.

Each panel is one budget ``C``: eval loss against model size, one line per architecture (dense, or
an MoE layout: expansion ``E``, granularity ``G``, shared experts), the mean over seeds with the
seed-to-seed standard deviation as error bars. A run's budget is its planned compute
``C = 3 x forward FLOPs per token x tokens`` of the runs of the same size and token count without a
shared expert (a shared expert adds compute on top of the budget its row was planned for; the
runs table keeps each run's own ``flops_per_token_forward``); budgets within a factor
:data:`GROUP_FACTOR` of each other form one panel (rows rounded to whole steps differ slightly).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moe_scaling.plots.runs import completed, run_label
from moe_scaling.plots.style import LOSS_LABEL, palette

__all__ = ["GROUP_FACTOR", "compute_budgets", "isoflop_minima", "isoflop_figure", "layout_minima_figure"]

GROUP_FACTOR = 1.3
"""Budgets closer than this factor are one panel."""

_SIZE = ["d_model", "n_layers", "tokens"]


def compute_budgets(runs: pd.DataFrame) -> pd.Series:
    """The planned training-compute budget of every run (see the module docstring), by index."""
    c = 3.0 * runs["flops_per_token_forward"].astype(float) * runs["tokens"].astype(float)
    plain = runs["n_shared"].fillna(0).astype(int) == 0 if "n_shared" in runs else pd.Series(True, runs.index)
    planned = c[plain].groupby([runs.loc[plain, k] for k in _SIZE]).min()
    keys = list(zip(*(runs[k] for k in _SIZE)))
    own = pd.Series([planned.get(k, np.nan) for k in keys], index=runs.index).fillna(c)
    levels: list[float] = []
    for v in sorted(own.unique()):
        if not levels or v > levels[-1] * GROUP_FACTOR:
            levels.append(v)
    return own.map(lambda v: max(lv for lv in levels if lv <= v))


def isoflop_minima(runs: pd.DataFrame, loss: str = "eval_loss") -> pd.DataFrame:
    """The numbers behind the figure: one row per (budget, architecture) with at least two sizes:
    ``budget``, ``arch``, ``sizes`` (``d<d_model> L<n_layers>`` by width), the mean ``losses`` over
    seeds at each size and their ``seeds`` counts, the size of the lowest mean (``best_size``), its
    loss (``best_loss``) and ``interior``: whether sizes of that architecture were trained on both
    sides of it (a minimum at an end says the sizes did not bracket it).

    Where the minimum is interior, ``optimal_params`` and ``optimal_loss`` locate it between the
    trained sizes: the vertex of the parabola in ``x = ln(params_active)`` through the lowest mean and
    its two neighbours (convex, since the middle one is lowest), ``exp(-b / 2a)`` and its value (the
    isoFLOP analysis of Hoffmann et al. 2022, approach 2, on three points); NaN at an end."""
    cols = ["budget", "arch", "sizes", "losses", "seeds", "best_size", "best_loss", "interior",
            "optimal_params", "optimal_loss"]
    done = completed(runs, loss).copy()
    if done.empty or "flops_per_token_forward" not in done:
        return pd.DataFrame(columns=cols)
    done["budget"] = compute_budgets(done)
    done["arch"] = [run_label(r) for _, r in done.iterrows()]
    rows = []
    for b, g in done.groupby("budget"):
        for arch, a in g.groupby("arch"):
            s = a.groupby(["d_model", "n_layers"]).agg(mean=(loss, "mean"), count=(loss, "count"),
                                                      params=("params_active", "median")).sort_index()
            if len(s) < 2:
                continue
            best = s["mean"].idxmin()
            interior = s.index[0] < best < s.index[-1]
            vertex = _vertex(np.log(s["params"].to_numpy(float)), s["mean"].to_numpy(float),
                             s.index.get_loc(best)) if interior else None
            rows.append({"budget": float(b), "arch": arch, "sizes": [f"d{d} L{n}" for d, n in s.index],
                         "losses": s["mean"].tolist(), "seeds": s["count"].astype(int).tolist(),
                         "best_size": f"d{best[0]} L{best[1]}", "best_loss": float(s["mean"].min()),
                         "interior": interior,
                         "optimal_params": np.nan if vertex is None else float(np.exp(vertex[0])),
                         "optimal_loss": np.nan if vertex is None else float(vertex[1])})
    return pd.DataFrame(rows, columns=cols)


def _vertex(x: np.ndarray, y: np.ndarray, i: int) -> tuple[float, float]:
    """``(x*, y*)``: the vertex of the parabola through points ``i - 1``, ``i``, ``i + 1``."""
    a, b, c = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    xv = -b / (2.0 * a)
    return float(xv), float(c - b * b / (4.0 * a))


def isoflop_figure(runs: pd.DataFrame, loss: str = "eval_loss") -> Figure | None:
    """One panel per budget with at least two model sizes; None when no budget has two."""
    done = completed(runs, loss).copy()
    if done.empty or "flops_per_token_forward" not in done:
        return None
    done["budget"] = compute_budgets(done)
    done["arch"] = [run_label(r) for _, r in done.iterrows()]
    budgets = [b for b, g in done.groupby("budget") if g.groupby(["d_model", "n_layers"]).ngroups >= 2]
    if not budgets:
        return None
    archs = sorted(done["arch"].unique(), key=lambda a: (a != "dense", a))
    pal = palette(range(len(archs)))
    colors = {a: "black" if a == "dense" else pal[float(i)] for i, a in enumerate(archs)}
    fig = Figure(figsize=(4.2 * len(budgets) + 1.8, 4.2), layout="constrained")
    axes = fig.subplots(1, len(budgets), sharey=True, squeeze=False)[0]
    for ax, b in zip(axes, budgets):
        g = done[done["budget"] == b]
        for arch in archs:
            a = g[g["arch"] == arch]
            if a.empty:
                continue
            s = a.groupby(["d_model", "n_layers"])[loss].agg(["mean", "std", "count"]).reset_index()
            ax.errorbar(s["d_model"], s["mean"], yerr=s["std"].fillna(0.0), marker="o" if arch == "dense" else "s",
                        ms=4, lw=1.2, capsize=2, color=colors[arch], ls="--" if arch == "dense" else "-",
                        label=arch)
        sizes = g[["d_model", "n_layers"]].drop_duplicates().sort_values("d_model")
        ax.set_xscale("log")
        ax.set_xticks(sizes["d_model"].tolist(), [f"d{d} L{n}" for d, n in sizes.itertuples(index=False)])
        ax.minorticks_off()
        ax.set_title(f"C = {b:.3g} FLOPs", fontsize="medium")
        ax.set_xlabel("model size (tokens = C / (3 x FLOPs per token))")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(LOSS_LABEL)
    seeds = int(done.groupby(["budget", "arch", "d_model", "n_layers"]).size().max())
    handles = {}                                   # every panel's lines: a budget may lack a layout
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[-1].legend([handles[a] for a in archs if a in handles], [a for a in archs if a in handles],
                    loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small",
                    title=f"mean ± sd over up to {seeds} seeds", title_fontsize="small")
    fig.suptitle(f"IsoFLOP curves: {len(done)} runs", fontsize="medium")
    return fig


def _layout_key(arch: str) -> tuple:
    """Sort order of layout labels: dense, then by expansion, shared last within it, then G."""
    if arch == "dense":
        return (0.0, 0, 0.0)
    parts = {p[0]: p[1:] for p in arch.split() if p[0] in "EG"}
    shared = next((int(p[1:-2]) for p in arch.split() if p.startswith("+") and p.endswith("sh")), 0)
    return (float(parts["E"]), shared, float(parts["G"]))


def layout_minima_figure(runs: pd.DataFrame, loss: str = "eval_loss",
                         noise_floor: float | None = None) -> Figure | None:
    """Each MoE layout's isoFLOP minimum minus dense's at the same budget (:func:`isoflop_minima`):
    one marker per budget, filled where the layout's minimum is interior to its trained sizes, hollow
    where it sits at an end (the true minimum may lie beyond). The grey band is +- 2 sqrt(2) noise
    floors around 0: two minima each of one run, each with the pooled seed-to-seed sd ``noise_floor``
    (default: :func:`moe_scaling.laws.noise.pooled_seed_sd` of ``runs``; no band without repeats).
    None when no budget has dense and a layout with two sizes each."""
    from moe_scaling.laws.noise import pooled_seed_sd

    m = isoflop_minima(runs, loss)
    if m.empty or not (m["arch"] == "dense").any():
        return None
    dense = m[m["arch"] == "dense"].set_index("budget")["best_loss"]
    dense_inside = m[m["arch"] == "dense"].set_index("budget")["interior"]
    moe = m[(m["arch"] != "dense") & m["budget"].isin(dense.index)]
    if moe.empty:
        return None
    archs = sorted(moe["arch"].unique(), key=_layout_key)
    budgets = sorted(moe["budget"].unique())
    colors = palette(budgets)
    if noise_floor is None:
        done = completed(runs, loss)
        noise_floor = pooled_seed_sd(done.assign(loss=done[loss]))["noise_floor"]
    fig = Figure(figsize=(max(6.0, 0.55 * len(archs) + 4.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    if noise_floor:
        band = 2.0 * np.sqrt(2.0) * noise_floor
        ax.axhspan(-band, band, color="0.85", zorder=0, label=f"±2√2 noise floors ({noise_floor:.4f})")
    ax.axhline(0.0, color="black", lw=1.0, ls="--", label="dense")
    step = 0.5 / max(len(budgets), 1)
    for j, b in enumerate(budgets):
        rows = moe[moe["budget"] == b].set_index("arch")
        x = [i + (j - (len(budgets) - 1) / 2) * step for i, a in enumerate(archs) if a in rows.index]
        gap = [rows.loc[a, "best_loss"] - dense[b] for a in archs if a in rows.index]
        inner = [bool(rows.loc[a, "interior"]) for a in archs if a in rows.index]
        c = colors[float(b)]
        ax.scatter(x, gap, s=36, marker="o", facecolors=[c if k else "none" for k in inner], edgecolors=[c] * len(x),
                   label=f"C = {b:.3g} FLOPs" + ("" if dense_inside[b] else " (dense's minimum at an end)"), zorder=3)
    ax.set_xticks(range(len(archs)), archs, rotation=45, ha="right", fontsize="small")
    ax.set_ylabel("isoFLOP minimum - dense's (nats)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", title="filled: minimum inside the sizes", title_fontsize="small",
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Which layout: each layout's best size against dense's, per training-compute budget",
                 fontsize="medium")
    return fig
