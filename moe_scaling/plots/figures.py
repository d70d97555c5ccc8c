"""Figures a scaling-law paper prints, from the objects the pipeline writes.

Every figure function takes a runs table (``runs.parquet`` of a sweep), a curves table, a fit or an
optimiser result and returns a :class:`matplotlib.figure.Figure`. Figures are built without
``pyplot`` (no global figure registry, no backend switch; PNG/SVG are written with Agg), so they
are safe in scripts, tests and notebooks alike (in a notebook, a returned figure displays itself).
:func:`save_figure` writes ``stem.png`` and ``stem.svg`` atomically.

The visual encoding of runs, shared by the cost-axis figures:

* colour: expansion ``E`` (total routed expert width over ``d_ff``), one colour per value;
* marker: granularity ``G`` (``d_ff / d_expert``);
* filled markers: no shared expert; hollow markers: one or more shared experts;
* dense runs (``n_experts <= 1``): black crosses joined by a dashed reference line;
* the Pareto frontier (lowest loss at no more cost) as a step line.

Memory on device of a measured run is its weight bytes at the chosen precision (default INT4: 4.5
bits per weight with group-32 fp16 scales, DESIGN.md section 3), computed with
:func:`moe_scaling.costs.weight_bytes` from the row's ModelConfig fields. Figures of a sweet-spot
search (:mod:`moe_scaling.design.search`) use the search's own axes: weights plus the KV cache at its
precision and context. Byte and FLOP axes pick their unit (KB/MB/GB, kFLOP/.../TFLOP) from the data
and say it in the label.

Groups: runs tables (:func:`sweep_figures`: ``moe-sweep plot``), fitted laws (:func:`law_curves`,
:func:`predicted_vs_observed`, :func:`residuals`) and searches (:func:`frontier_figure`,
:func:`optimum_vs_budget`, :func:`iso_loss_contours`, :func:`published_models_figure`), together
:func:`fit_figures` (``moe-fit --plot``).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib import colormaps, rc_context
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from moe_scaling.config import ModelConfig
from moe_scaling.costs import flops_per_token, param_counts, published_models, weight_bytes
from moe_scaling.files import atomic_write_bytes
from moe_scaling.laws.registry import LAW_INPUTS
from moe_scaling.units import format_bytes, format_count

__all__ = [
    # runs tables
    "save_figure", "model_config_from_row", "with_costs", "completed", "pareto_mask", "run_label",
    "loss_vs_memory", "loss_vs_flops", "published_points", "published_models_figure", "select_runs",
    "training_curves", "expert_load_figure", "balance_run", "sweep_figures",
    # fits and sweet spots
    "law_inputs", "fitted_rows", "fit_heldout", "law_curves", "predicted_vs_observed", "residuals", "frontier_figure",
    "optimum_vs_budget", "iso_loss_grid", "iso_loss_contours", "fit_figures",
]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "*", "<", ">")
BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0))
FLOP_UNITS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3), ("FLOP", 1.0))
LOSS_LABEL = "eval loss (nats/token)"
WIDE = (8.0, 4.8)      # a figure with a legend on its right
SQUARE = (5.6, 4.8)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_figure(fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = ("png", "svg"),
                dpi: int = 150) -> list[Path]:
    """Write ``fig`` to ``stem.png`` and ``stem.svg`` (atomically: temp file, then rename).

    The SVG carries no date and fixed element ids, so the same figure gives the same bytes.
    Returns the written paths.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        with rc_context({"svg.hashsalt": "moe-scaling"}):
            fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out


# --------------------------------------------------------------------------------------
# Runs tables: configs, costs, frontier
# --------------------------------------------------------------------------------------

_MODEL_FIELDS = {f.name: str(f.type) for f in fields(ModelConfig)}


def _plain(value: Any, annotation: str) -> Any:
    """A table cell as the Python value a ModelConfig field wants (numpy -> int/float/bool/None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if annotation.startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def model_config_from_row(row: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of one runs-table row (plain ``d_model`` or ``model.d_model`` columns)."""
    data = {}
    for name, annotation in _MODEL_FIELDS.items():
        for key in (name, f"model.{name}"):
            if key in row:
                value = _plain(row[key], annotation)
                if value is not None:
                    data[name] = value
                break
    return ModelConfig(**data)


def with_costs(runs: pd.DataFrame, weights: str = "int4") -> pd.DataFrame:
    """A copy of ``runs`` with ``memory_bytes`` (weights at ``weights``), ``flops_per_token_forward``
    (kept when present, else computed at each row's ``max_seq_len``) and ``is_dense`` columns."""
    out = runs.copy()
    configs = [model_config_from_row(row) for row in out.to_dict("records")]
    out["memory_bytes"] = [weight_bytes(c, weights) for c in configs]
    if "flops_per_token_forward" not in out:
        out["flops_per_token_forward"] = [flops_per_token(c) for c in configs]
    out["is_dense"] = [not c.is_moe for c in configs]
    for name in ("expansion", "granularity"):
        if name not in out:
            out[name] = [getattr(c, name) for c in configs]
    if "n_shared" not in out:
        out["n_shared"] = [c.n_shared for c in configs]
    return out


def completed(runs: pd.DataFrame, loss: str = "eval_loss") -> pd.DataFrame:
    """Rows with ``status == completed`` (when the column exists) and a finite ``loss``."""
    keep = np.isfinite(pd.to_numeric(runs[loss], errors="coerce").to_numpy(float))
    if "status" in runs:
        keep &= (runs["status"] == "completed").to_numpy()
    return runs[keep]


def pareto_mask(cost: Iterable[float], loss: Iterable[float]) -> np.ndarray:
    """Boolean mask of the Pareto-optimal points: no other point is at least as good in both cost
    and loss and better in one (of exact duplicates the first is kept)."""
    cost = np.asarray(list(cost), float)
    loss = np.asarray(list(loss), float)
    order = np.lexsort((loss, cost))
    mask = np.zeros(len(cost), bool)
    best = np.inf
    for i in order:
        if loss[i] < best:
            mask[i] = True
            best = loss[i]
    return mask


def run_label(row: Mapping[str, Any], with_size: bool = False) -> str:
    """Short legend text for a run: ``E8 G2 k4 +1sh`` (MoE) or ``dense`` (plus ``d64 L2`` sizes)."""
    size = f"d{int(row['d_model'])} L{int(row['n_layers'])} " if with_size else ""
    if int(row.get("n_experts", 1)) <= 1:
        return f"{size}dense"
    shared = f" +{int(row['n_shared'])}sh" if int(row.get("n_shared", 0)) else ""
    return (f"{size}E{float(row['expansion']):g} G{float(row['granularity']):g} "
            f"k{int(row['top_k'])}{shared}")


def _unit(values: Iterable[float], unit: str = "auto",
          units: Sequence[tuple[str, float]] = BYTE_UNITS) -> tuple[str, float]:
    """(unit name, scale): ``auto`` picks the largest of ``units`` the biggest value reaches."""
    if unit != "auto":
        table = dict(units)
        if unit not in table:
            raise ValueError(f"unit = {unit!r}: use one of auto, {', '.join(table)}")
        return unit, table[unit]
    top = max(values, default=1.0)
    return next(((n, s) for n, s in units if top >= s), units[-1])


def _log_axis(ax, which: str = "x", fmt=lambda v: f"{v:g}") -> None:
    """Plain-number tick labels on a log axis: round linear steps within half a decade, 1-2-3-5-7
    within one;
    1, 2, 5, 10, ... up to three; decades only beyond. Call after the limits are final."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    span = math.log10(hi / lo)
    if span <= 0.5:  # a narrow range: evenly spaced round numbers read best
        axis.set_major_locator(MaxNLocator(nbins=6))
    elif span <= 1:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span > 3 else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


_OFFSETS = ((7, -3, "left", "top"), (7, 3, "left", "bottom"), (-7, -3, "right", "top"),
            (-7, 3, "right", "bottom"), (0, -9, "center", "top"), (0, 9, "center", "bottom"))


def _label_points(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str],
                  avoid: tuple[Sequence[float], Sequence[float]] = ((), ()), **style) -> None:
    """Annotate points so labels overlap neither each other, nor the points (nor the ``avoid``
    points), nor the axes edge.

    Greedy: each label takes the first of a few offsets (right-below, right-above, left-below,
    left-above, below, above) whose drawn box is free; if none is, the one overlapping least.
    The figure is laid out first so pixel positions match the saved figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    fig = ax.get_figure()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for x, y in zip([*xs, *avoid[0]], [*ys, *avoid[1]])]
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in dots]

    def area(a, b):
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return max(w, 0) * max(h, 0)

    for x, y, text in zip(xs, ys, texts):
        best = None
        for dx, dy, ha, va in _OFFSETS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              **style)
            box = ann.get_window_extent(renderer)
            outside = box.width * box.height - area(box, frame)
            cost = sum(area(box, t) for t in taken) + 10 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _palette(values: Sequence[float]) -> dict[float, Any]:
    """One colour per distinct value, in increasing order along viridis (its pale end left out)."""
    vals = sorted(set(float(v) for v in values))
    cmap = colormaps["viridis"]
    if len(vals) == 1:
        return {vals[0]: cmap(0.35)}
    return {v: cmap(0.85 * i / (len(vals) - 1)) for i, v in enumerate(vals)}


def _markers(values: Sequence[float]) -> dict[float, str]:
    vals = sorted(set(float(v) for v in values))
    return {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(vals)}


def _legend_right(ax, handles: list, labels: list[str], headers: Iterable[str] = ()) -> None:
    """One legend outside the axes on the right; ``headers`` entries are set in bold."""
    leg = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                    fontsize="small", handletextpad=0.5, borderaxespad=0.0)
    headers = set(headers)
    for text in leg.get_texts():
        if text.get_text() in headers:
            text.set_fontweight("bold")


def _header(text: str) -> tuple[Line2D, str]:
    return Line2D([], [], linestyle="none"), text


def _scatter_runs(ax, runs: pd.DataFrame, x: np.ndarray, loss: str, frontier_label: str) -> None:
    """Draw runs on ``ax`` with the shared encoding, dense reference and Pareto frontier; add the legend."""
    y = runs[loss].to_numpy(float)
    dense = runs["is_dense"].to_numpy(bool)
    moe = runs[~dense]
    colours = _palette(moe["expansion"]) if len(moe) else {}
    markers = _markers(moe["granularity"]) if len(moe) else {}
    mx, my = x[~dense], y[~dense]
    for (e, g, shared), idx in moe.groupby(
            [moe["expansion"].astype(float), moe["granularity"].astype(float),
             moe["n_shared"].astype(int) > 0]).indices.items():
        c = colours[e]
        ax.scatter(mx[idx], my[idx], s=46, marker=markers[g], linewidths=1.4, zorder=3,
                   facecolors="white" if shared else c, edgecolors=c)
    handles: list = []
    labels: list[str] = []
    headers = []
    if dense.any():
        order = np.argsort(x[dense])
        dx, dy = x[dense][order], y[dense][order]
        if len(dx) == 1:
            ax.axhline(dy[0], color="black", linestyle="--", linewidth=1.0, zorder=2)
        else:
            ax.plot(dx, dy, color="black", linestyle="--", linewidth=1.0, zorder=2)
        ax.scatter(dx, dy, marker="x", color="black", s=40, linewidths=1.5, zorder=4)
        handles.append(Line2D([], [], color="black", linestyle="--", marker="x"))
        labels.append(f"dense ({int(dense.sum())} run{'s' if dense.sum() > 1 else ''})")
    front = pareto_mask(x, y)
    order = np.argsort(x[front])
    fx, fy = x[front][order], y[front][order]
    ax.step(fx, fy, where="post", color="tab:red", linewidth=1.6, alpha=0.8, zorder=2)
    ax.scatter(fx, fy, s=130, facecolors="none", edgecolors="tab:red", linewidths=1.0, zorder=2)
    handles.append(Line2D([], [], color="tab:red", linewidth=1.6, marker="o", markersize=9,
                          markerfacecolor="none"))
    labels.append(frontier_label)
    if colours:
        h, t = _header("expansion E (colour)")
        handles.append(h); labels.append(t); headers.append(t)
        for e, c in colours.items():
            handles.append(Line2D([], [], linestyle="none", marker="o", color=c, markersize=7))
            labels.append(f"E = {e:g}")
        h, t = _header("granularity G (marker)")
        handles.append(h); labels.append(t); headers.append(t)
        for g, m in markers.items():
            handles.append(Line2D([], [], linestyle="none", marker=m, color="0.35", markersize=7))
            labels.append(f"G = {g:g}")
        h, t = _header("shared experts")
        handles.append(h); labels.append(t); headers.append(t)
        handles.append(Line2D([], [], linestyle="none", marker="o", color="0.35", markersize=7))
        labels.append("none (filled)")
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white",
                              markeredgecolor="0.35", markeredgewidth=1.4, markersize=7))
        labels.append(">= 1 (hollow)")
    _legend_right(ax, handles, labels, headers)
    ax.set_ylabel(LOSS_LABEL if loss in ("eval_loss", "best_eval_loss") else loss)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)


def _published_lines(ax, scale: float, weights: str, kind: str = "memory") -> None:
    """Vertical dotted lines at the published models' memory (or FLOPs) with their names on top."""
    for i, (name, pm) in enumerate(sorted(published_models().items())):
        if pm.config is None:
            continue
        v = (weight_bytes(pm.config, weights) if kind == "memory" else flops_per_token(pm.config)) / scale
        ax.axvline(v, color="0.4", linestyle=":", linewidth=1.0, zorder=1)
        ax.annotate(name, (v, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -4 - 11 * (i % 2)),
                    textcoords="offset points", fontsize="x-small", color="0.3", va="top", rotation=0)


def _title_note(runs: pd.DataFrame, kept: pd.DataFrame) -> str:
    dropped = len(runs) - len(kept)
    return f"{len(kept)} completed runs" + (f" ({dropped} not completed, not shown)" if dropped else "")


def loss_vs_memory(runs: pd.DataFrame, *, loss: str = "eval_loss", weights: str = "int4",
                   unit: str = "auto", published: bool = False) -> Figure:
    """Loss vs memory on device (weight bytes at ``weights``, log axis) with the Pareto frontier.

    ``unit`` is ``auto`` (the largest of GB/MB/KB the biggest model reaches) or one of GB, MB, KB, B.
    ``published=True`` marks the published models' memory as labelled vertical lines (useful when
    the runs are full-size; tiny sweep models sit far to the left of them).
    """
    kept = with_costs(completed(runs, loss), weights)
    name, scale = _unit(kept["memory_bytes"], unit)
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.add_subplot()
    x = kept["memory_bytes"].to_numpy(float) / scale
    _scatter_runs(ax, kept, x, loss, "Pareto frontier\n(lowest loss at <= memory)")
    if published:
        _published_lines(ax, scale, weights)
    ax.set_xscale("log")
    _log_axis(ax, "x")
    ax.set_xlabel(f"memory on device: weights at {weights.upper()} ({name}, log scale)")
    ax.set_title(f"Loss vs memory on device: {_title_note(runs, kept)}", fontsize="medium")
    return fig


def loss_vs_flops(runs: pd.DataFrame, *, loss: str = "eval_loss") -> Figure:
    """Loss vs forward FLOPs per token (log axis) with the Pareto frontier, same encoding as
    :func:`loss_vs_memory`. FLOPs come from the table's ``flops_per_token_forward`` column."""
    kept = with_costs(completed(runs, loss))
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.add_subplot()
    name, scale = _unit(kept["flops_per_token_forward"], units=FLOP_UNITS)
    x = kept["flops_per_token_forward"].to_numpy(float) / scale
    _scatter_runs(ax, kept, x, loss, "Pareto frontier\n(lowest loss at <= FLOPs)")
    ax.set_xscale("log")
    _log_axis(ax, "x")
    ax.set_xlabel(f"forward FLOPs per token ({name}, log scale)")
    ax.set_title(f"Loss vs compute per token: {_title_note(runs, kept)}", fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------
# Published models on the cost axes
# --------------------------------------------------------------------------------------


def published_points(weights: str = "int4", context: int = 4096) -> pd.DataFrame:
    """The published models on our cost axes: ``name, memory_bytes, flops_per_token_forward,
    params_total, params_active, exact``.

    Models shipped with an architecture get exact costs (weights at ``weights``, forward FLOPs at
    ``context``). Count-only models (MobileMoE-S/M) get memory from their published total
    (``params_total`` x bits per weight / 8; router and norms are < 0.1%) and no FLOPs.
    """
    from moe_scaling.units import parse_precision

    bits = parse_precision(weights).bits_per_value
    rows = []
    for name, pm in sorted(published_models().items()):
        if pm.config is not None:
            rows.append(dict(name=name, memory_bytes=weight_bytes(pm.config, weights),
                             flops_per_token_forward=flops_per_token(pm.config, context),
                             params_total=pm.params_total, params_active=pm.params_active, exact=True))
        else:
            rows.append(dict(name=name, memory_bytes=pm.params_total * bits / 8,
                             flops_per_token_forward=np.nan, params_total=pm.params_total,
                             params_active=pm.params_active, exact=False))
    return pd.DataFrame(rows)


def published_models_figure(result: Any = None, *, weights: str = "int4", context: int = 4096) -> Figure:
    """Published MoE models as labelled points on (memory on device, forward FLOPs per token).

    Without ``result``: memory is the weights at ``weights`` and FLOPs are at ``context``
    (:func:`published_points`). With an ``optimize.SearchResult`` (or its dict), the models and
    the predicted Pareto frontier are drawn on that search's axes (weights + KV cache at its
    precisions and context), the frontier coloured by predicted loss and the budget marked.
    """
    if result is None:
        pts = published_points(weights, context)
        pts = pts[pts["exact"]].rename(columns={"memory_bytes": "x_bytes"})
        xlabel = f"memory on device: weights at {weights.upper()} (GB, log scale)"
        frontier, budget = None, None
    else:
        r = _result(result)
        budget = r["budget"]
        context = budget["context"]
        pts = pd.DataFrame(r["published"]).rename(columns={"total_bytes": "x_bytes"})
        frontier = pd.DataFrame(r["frontier"])
        xlabel = _memory_label(budget, "GB")
    fig = Figure(figsize=SQUARE if frontier is None else WIDE, layout="constrained")
    ax = fig.add_subplot()
    x = pts["x_bytes"].to_numpy(float) / 1e9
    y = pts["flops_per_token_forward"].to_numpy(float) / 1e9
    ax.scatter(x, y, s=60, color="tab:blue", edgecolors="black", linewidths=0.6, zorder=3,
               label="published model")
    names = [f"{n}\n{format_count(pa)} active / {format_count(pt)} total"
             for n, pa, pt in zip(pts["name"], pts["params_active"], pts["params_total"])]
    if frontier is not None and len(frontier):
        sc = ax.scatter(frontier["total_bytes"].to_numpy(float) / 1e9,
                        frontier["flops_per_token_forward"].to_numpy(float) / 1e9,
                        c=frontier["predicted_loss"].to_numpy(float), cmap="viridis_r", s=22,
                        marker="o", zorder=2, label="predicted Pareto frontier")
        fig.colorbar(sc, ax=ax, label="predicted loss of the frontier model (nats/token)", pad=0.01)
        ax.axvline(budget["memory"] / 1e9, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"memory budget {budget['memory'] / 1e9:.3g} GB")
        ax.legend(loc="upper left", fontsize="small")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # room for the labels on the right of and below the points
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 2.5)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / 1.5, hi)
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"forward GFLOP per token at context {context} (log scale)")
    ax.set_title("Published MoE models on the cost axes"
                 + ("" if frontier is None else f" with the predicted frontier\n({_tokens_note(budget)})"),
                 fontsize="medium")
    ax.grid(True, which="both", alpha=0.2)
    avoid = ((frontier["total_bytes"] / 1e9, frontier["flops_per_token_forward"] / 1e9)
             if frontier is not None and len(frontier) else ((), ()))
    _label_points(ax, x, y, names, fontsize="x-small", avoid=avoid)
    return fig


# --------------------------------------------------------------------------------------
# Training curves and expert load
# --------------------------------------------------------------------------------------


def select_runs(runs: pd.DataFrame, n: int = 6, loss: str = "eval_loss") -> list[str]:
    """``n`` completed run ids spread evenly over the loss range (best and worst included)."""
    done = completed(runs, loss).sort_values(loss)
    if len(done) <= n:
        return list(done["run_id"])
    idx = np.unique(np.round(np.linspace(0, len(done) - 1, n)).astype(int))
    return list(done["run_id"].iloc[idx])


def _multi_size(runs: pd.DataFrame) -> bool:
    return runs[["d_model", "n_layers"]].drop_duplicates().shape[0] > 1


def training_curves(curves: pd.DataFrame, runs: pd.DataFrame | None = None,
                    run_ids: Sequence[str] | None = None, *, max_runs: int = 6) -> Figure:
    """Loss vs training tokens (log axis) of selected runs: train loss as a thin line, eval loss
    as circles on a dashed line, one colour per run.

    ``run_ids`` defaults to :func:`select_runs` over ``runs`` (or the first ``max_runs`` ids of
    ``curves`` when ``runs`` is None). Legend entries read ``E8 G2 k4 +1sh: 2.31`` (final eval loss)
    when ``runs`` is given. Points at 0 tokens are left out of the log axis.
    """
    if run_ids is None:
        run_ids = (select_runs(runs, max_runs) if runs is not None
                   else list(pd.unique(curves["run_id"]))[:max_runs])
    info = runs.set_index("run_id") if runs is not None else None
    with_size = runs is not None and _multi_size(runs)
    colours = colormaps["tab10"]
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.add_subplot()
    handles, labels = [], []
    for i, rid in enumerate(run_ids):
        c = curves[(curves["run_id"] == rid) & (curves["tokens"] > 0)].sort_values("step")
        if c.empty:
            continue
        colour = colours(i % 10)
        tr = c[np.isfinite(c["train_loss"].to_numpy(float))]
        ax.plot(tr["tokens"], tr["train_loss"], color=colour, linewidth=1.1, alpha=0.6)
        ev = c[np.isfinite(c["eval_loss"].to_numpy(float))]
        ax.plot(ev["tokens"], ev["eval_loss"], color=colour, linestyle="--", marker="o", markersize=3.5,
                linewidth=1.0)
        label = str(rid)[:10]
        if info is not None and rid in info.index:
            row = info.loc[rid]
            label = f"{run_label(row, with_size)}: {float(row['eval_loss']):.3f}"
        handles.append(Line2D([], [], color=colour, marker="o", markersize=4, linestyle="--"))
        labels.append(label)
    h, t = _header("style")
    handles += [h, Line2D([], [], color="0.4", linewidth=0.9), Line2D([], [], color="0.4", linestyle="--",
                                                                        marker="o", markersize=3.5)]
    labels += [t, "train loss", "eval loss"]
    _legend_right(ax, handles, labels, headers=[t, "run: final eval loss"] if info is not None else [t])
    if info is not None:
        ax.get_legend().set_title("run: final eval loss", prop={"size": "small", "weight": "bold"})
    ax.set_xscale("log")
    _log_axis(ax, "x", _si)
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Training curves of {len(labels) - 3} runs", fontsize="medium")
    ax.grid(True, which="both", alpha=0.2)
    return fig


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _load_array(load: Any) -> np.ndarray:
    """An expert-load value (array, nested list or the JSON text a runs table stores) as
    ``[n_layers, n_experts]``."""
    if isinstance(load, str):
        import json
        load = json.loads(load)
    arr = np.asarray(load, float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"expert load of shape {arr.shape}: expected [n_layers, n_experts] with >= 2 experts")
    return arr


def expert_load_figure(load: Any, *, title: str | None = None, max_grouped_layers: int = 4) -> Figure:
    """Expert-load balance of one run: the share of routed assignments each expert received (%).

    ``load`` is ``[n_moe_layers, n_experts]`` (rows sum to 1; ``TrainResult.metrics["expert_load"]``),
    ``[n_experts]``, JSON text of either, or a runs-table row (its ``expert_load_per_layer``, else
    ``expert_load`` column; the title then defaults to the run's label). With up to
    ``max_grouped_layers`` layers the bars are grouped by layer; with more, the bar is the mean over
    layers and the whisker spans the layers' min to max. The dashed line is perfect balance (1/E).
    """
    if isinstance(load, (pd.Series, Mapping)):
        row = load
        key = "expert_load_per_layer" if _present(row.get("expert_load_per_layer")) else "expert_load"
        load = row[key]
        title = title or f"{run_label(row)} (run {row.get('run_id', '?')})"
    arr = _load_array(load) * 100.0
    n_layers, n_experts = arr.shape
    fig = Figure(figsize=(max(5.6, min(12.0, 2.5 + 0.22 * n_experts)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    xs = np.arange(n_experts)
    if n_layers <= max_grouped_layers:
        width = 0.8 / n_layers
        for layer in range(n_layers):
            ax.bar(xs - 0.4 + width * (layer + 0.5), arr[layer], width=width,
                   color=colormaps["tab10"](layer), label=f"MoE layer {layer}" if n_layers > 1 else None)
    else:
        mean = arr.mean(0)
        ax.bar(xs, mean, width=0.8, color="tab:blue", label=f"mean of {n_layers} MoE layers")
        ax.errorbar(xs, mean, yerr=[mean - arr.min(0), arr.max(0) - mean], fmt="none", ecolor="black",
                    elinewidth=0.8, capsize=2, label="min to max over layers")
    ax.axhline(100.0 / n_experts, color="black", linestyle="--", linewidth=1.0,
               label=f"balanced: {100.0 / n_experts:.3g}%")
    worst = arr.max() / (100.0 / n_experts)
    ax.set_xlabel("expert index")
    ax.set_ylabel("share of routed assignments (%)")
    step = max(1, int(math.ceil(n_experts / 16)))
    ax.set_xticks(xs[::step])
    ax.set_xlim(-0.6, n_experts - 0.4)
    ax.set_ylim(0, arr.max() * 1.35)
    ax.legend(loc="upper center", fontsize="small", ncols=3, frameon=False)
    head = f"Expert load of {title}" if title else "Expert load"
    ax.set_title(f"{head}\nbusiest expert: {worst:.2f}x its balanced share", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


# --------------------------------------------------------------------------------------
# Standard sets
# --------------------------------------------------------------------------------------


def balance_run(runs: pd.DataFrame, loss: str = "eval_loss") -> pd.Series | None:
    """The completed run whose expert load is most worth showing: the lowest-loss MoE run that
    routes to a strict subset of its experts (``top_k < n_experts``) and recorded its load."""
    done = completed(runs, loss)
    if "expert_load" not in done:
        return None
    has = done["expert_load"].map(_present)
    cand = done[has & (done["n_experts"] > done["top_k"])]
    return None if cand.empty else cand.sort_values(loss).iloc[0]


def sweep_figures(runs: pd.DataFrame, curves: pd.DataFrame | None = None, *,
                  weights: str = "int4") -> dict[str, Figure]:
    """The standard figures of a sweep: ``loss_vs_memory``, ``loss_vs_flops``, ``training_curves``
    (when ``curves`` has rows) and ``expert_load`` (of :func:`balance_run`, when there is one).
    Raises ValueError when no run completed."""
    if completed(runs).empty:
        raise ValueError(f"no completed runs with a finite eval_loss among {len(runs)} runs; "
                         "nothing to plot")
    figs = {"loss_vs_memory": loss_vs_memory(runs, weights=weights), "loss_vs_flops": loss_vs_flops(runs)}
    if curves is not None and len(curves):
        figs["training_curves"] = training_curves(curves, runs)
    row = balance_run(runs)
    if row is not None:
        figs["expert_load"] = expert_load_figure(row)
    return figs


# --------------------------------------------------------------------------------------
# Fitted laws: curves, diagnostics
# --------------------------------------------------------------------------------------



def law_inputs(table: pd.DataFrame | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The canonical law columns (float arrays) of a runs table, as ``Fit.predict`` takes them."""
    return {c: np.asarray(table[c], dtype=np.float64) for c in LAW_INPUTS if c in table}


def _interval(fit: Any, X: Mapping[str, np.ndarray], level: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``fit.predict_interval(X, level)`` as two arrays, or None when the fit has no bootstrap."""
    fn = getattr(fit, "predict_interval", None)
    if fn is None:
        return None
    try:
        lo, hi = fn(X, level=level)
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
    drop = int((getattr(fit, "settings", {}) or {}).get("drop_highest_loss") or 0)
    if drop:
        done = done[done[loss].rank(method="first", ascending=False).to_numpy() > drop]
    return done


def fit_heldout(fit: Any, runs: pd.DataFrame, loss: str = "eval_loss") -> list[str]:
    """Run ids of the runs ``fit`` held out for its ``heldout_rmse``, recomputed with the fit's own
    rule (:func:`moe_scaling.laws.tables.holdout_mask` over its ``heldout_by`` ranking, ``heldout_frac``
    of :func:`fitted_rows`); [] when the fit held nothing out."""
    from moe_scaling.laws.tables import holdout_mask

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


def _law_name(fit: Any) -> str:
    law = getattr(fit, "law", None)
    return str(getattr(law, "name", law)) if law is not None else "fitted law"


def _config_line(cfg: ModelConfig, n_experts: np.ndarray, weights: str = "int4") -> dict[str, np.ndarray]:
    """Exact counts of ``cfg`` with ``n_experts`` replaced by each value (real values allowed).

    For a fixed trunk and expert width every count and byte is affine in ``n_experts`` (each
    expert adds the same weights and one router row), so two exact evaluations give the line.
    Returns ``params_active``, ``params_total``, ``params_embedding`` and ``weight_bytes`` (at
    ``weights``) arrays."""
    import dataclasses

    n0 = max(cfg.top_k + 1, 2)
    a = dataclasses.replace(cfg, n_experts=n0)
    b = dataclasses.replace(cfg, n_experts=n0 + 1)
    out = {}
    for name, fn in (("params_active", lambda c: param_counts(c).active),
                     ("params_total", lambda c: param_counts(c).total),
                     ("params_embedding", lambda c: param_counts(c).embedding),
                     ("weight_bytes", lambda c: weight_bytes(c, weights))):
        va, vb = float(fn(a)), float(fn(b))
        out[name] = va + (np.asarray(n_experts, float) - n0) * (vb - va)
    return out


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
        line = _config_line(base, n)
        tokens = float(grp["tokens"].median())
        X = {"params_active": line["params_active"], "params_total": line["params_total"],
             "params_embedding": line["params_embedding"], "tokens": np.full(n.shape, tokens),
             "expansion": n / base.granularity, "granularity": np.full(n.shape, base.granularity),
             "n_shared": np.full(n.shape, float(base.n_shared))}
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
    _legend_right(ax, handles, labels)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("expansion E = n_experts / G (total routed width over d_ff, log scale)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(f"{_law_name(fit)}: fitted law vs the runs (each layout at its trunk and tokens)",
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
    ax.set_title(f"{_law_name(fit)}: predicted vs observed"
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
    _log_axis(ax, "x", _si)
    ax.set_xlabel(f"{names.get(x, x)} (log scale)")
    ax.set_ylabel("residual: observed / predicted - 1 (%)")
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    ax.set_title(f"{_law_name(fit)}: residuals", fontsize="medium")
    ax.grid(True, alpha=0.3)
    return fig


# --------------------------------------------------------------------------------------
# Sweet spots and predicted frontiers (optimize.SearchResult or its to_dict())
# --------------------------------------------------------------------------------------


def _result(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def _published_on_scale(r: Mapping[str, Any], xkey: str = "total_bytes") -> list[dict[str, Any]]:
    """The search's published models within 30x of its frontier's cost range on ``xkey`` (a
    frontier of kilobyte models and a 5 GB model share no useful axis)."""
    xs = [p[xkey] for p in r.get("frontier") or []]
    if not xs:
        return []
    return [p for p in r.get("published") or [] if min(xs) / 30 <= p[xkey] <= max(xs) * 30]


def _memory_label(budget: Mapping[str, Any], unit: str, what: str = "memory on device") -> str:
    return (f"{what}: weights {budget['weights'].upper()} + KV cache {budget['kv'].upper()} "
            f"at {budget['context']} tokens ({unit}, log scale)")


def _tokens_note(budget: Mapping[str, Any]) -> str:
    """Training tokens (or compute) and the budgets beyond memory, for a title."""
    if budget.get("tokens") is not None:
        note = f"{format_count(float(budget['tokens']))} training tokens"
    else:
        note = f"training compute {float(budget['train_compute']):.3g} FLOPs ({budget['compute_rule']})"
    if budget.get("flops_per_token"):
        note += f", <= {float(budget['flops_per_token']) / 1e9:.3g} GFLOP/token"
    if budget.get("latency_ms"):
        note += f", decode <= {float(budget['latency_ms']):g} ms/token on {budget['device']}"
    return note


def _arch(d: Mapping[str, Any]) -> str:
    """``0.92B active / 5.33B total, E 7.5 G 8 +1 shared`` (or ``dense``) of a described config."""
    size = f"{format_count(d['params_active'])} active / {format_count(d['params_total'])} total"
    if d.get("n_experts", 1) <= 1:
        return f"dense {size}"
    shared = f" +{d['n_shared']} shared" if d.get("n_shared") else ""
    return f"{size}, E {d['expansion']:.3g} G {d['granularity']:g}{shared}"


def _loss_text(d: Mapping[str, Any]) -> str:
    iv = d.get("predicted_loss_interval")
    return f"{d['predicted_loss']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")


def _point_with_interval(ax, d: Mapping[str, Any], x: float, **style) -> None:
    iv = d.get("predicted_loss_interval")
    yerr = None if not iv else [[d["predicted_loss"] - iv[0]], [iv[1] - d["predicted_loss"]]]
    ax.errorbar([x], [d["predicted_loss"]], yerr=yerr, capsize=3, elinewidth=1.0, zorder=5, **style)


def frontier_figure(result: Any, *, axis: str = "memory", published: bool = True,
                    zoom: float | None = 10.0) -> Figure:
    """The predicted Pareto frontier of one search: predicted loss vs memory on device (or vs
    forward FLOPs per token with ``axis="flops"``), frontier models coloured by expansion, the
    dense frontier dashed, the budget as a vertical line (beyond it shaded), the sweet spot (red
    star) and best dense model (black square) with their bootstrap intervals, and the published
    models (grey diamonds, labelled) at their predicted loss under the same law and tokens.

    ``zoom``: frontier points cheaper than ``budget / zoom`` are left out (the law's far
    extrapolation to tiny models would set the loss axis); None shows the whole frontier."""
    from matplotlib.colors import LogNorm

    r = _result(result)
    b = r["budget"]
    memory = axis == "memory"
    if axis not in ("memory", "flops"):
        raise ValueError(f"axis = {axis!r}: use memory or flops")
    xkey = "total_bytes" if memory else "flops_per_token_forward"
    front = pd.DataFrame(r["frontier"] if memory else r["frontier_flops"])
    limit = b["memory"] if memory else b.get("flops_per_token")
    if zoom and len(front):
        anchor = limit if limit else (r.get("sweet_spot") or {}).get(xkey)
        if anchor:
            front = front[front[xkey] >= anchor / zoom]
    span = (list(front[xkey]) if len(front) else []) + ([limit] if limit else [])
    unit, scale = _unit(span or [1.0], units=BYTE_UNITS if memory else FLOP_UNITS)
    pub = _published_on_scale(r, xkey) if published else []
    fig = Figure(figsize=(8.4, 6.2), layout="constrained")
    ax = fig.add_subplot()
    handles, labels = [], []
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
    if memory and r.get("frontier_dense"):
        dense = pd.DataFrame(r["frontier_dense"])
        if zoom and limit:
            dense = dense[dense[xkey] >= limit / zoom]
        ax.plot(dense[xkey] / scale, dense["predicted_loss"], color="black", linestyle="--", linewidth=1.2)
        handles.append(Line2D([], [], color="black", linestyle="--"))
        labels.append("predicted frontier (dense only)")
    s, d = r.get("sweet_spot"), r.get("dense")
    if d:
        _point_with_interval(ax, d, d[xkey] / scale, fmt="s", color="black", markersize=7)
        handles.append(Line2D([], [], linestyle="none", marker="s", color="black", markersize=7))
        labels.append(f"best dense: {_arch(d)}; loss {_loss_text(d)}")
    if s:
        _point_with_interval(ax, s, s[xkey] / scale, fmt="*", color="tab:red", markersize=15,
                             markeredgecolor="black", markeredgewidth=0.6)
        handles.append(Line2D([], [], linestyle="none", marker="*", color="tab:red", markersize=13,
                              markeredgecolor="black", markeredgewidth=0.6))
        labels.append(f"sweet spot: {_arch(s)}; loss {_loss_text(s)}")
    if pub:
        ax.scatter([p[xkey] / scale for p in pub], [p["predicted_loss"] for p in pub], marker="D",
                   color="0.55", edgecolors="black", linewidths=0.5, s=34, zorder=4)
        handles.append(Line2D([], [], linestyle="none", marker="D", color="0.55", markeredgecolor="black",
                              markeredgewidth=0.5))
        labels.append("published model (the law's prediction for it)")
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * (3.0 if pub else 1.0))    # room for the labels right of the points
    if limit:
        ax.axvline(limit / scale, color="tab:red", linestyle=":", linewidth=1.2)
        ax.axvspan(limit / scale, ax.get_xlim()[1], color="0.5", alpha=0.08, linewidth=0)
        handles.append(Line2D([], [], color="tab:red", linestyle=":"))
        labels.append(f"budget: {limit / scale:.3g} {unit}{'' if memory else ' per token'} (shaded: over)")
    _log_axis(ax, "x")
    ax.set_xlabel(_memory_label(b, unit) if memory
                  else f"forward {unit} per token at {b['context']} tokens (log scale)")
    ax.set_ylabel("predicted loss (nats/token)")
    fig.legend(handles, labels, loc="outside lower center", fontsize="small", ncols=1, frameon=False)
    ax.set_title(f"Predicted loss vs {'memory' if memory else 'compute'}\n({_tokens_note(b)})",
                 fontsize="medium")
    ax.grid(True, which="both", alpha=0.2)
    if pub:
        _label_points(ax, [p[xkey] / scale for p in pub], [p["predicted_loss"] for p in pub],
                      [p["name"] for p in pub], fontsize="x-small", color="0.25",
                      avoid=(front[xkey] / scale, front["predicted_loss"]) if len(front) else ((), ()))
    return fig


def optimum_vs_budget(results: Sequence[Any]) -> Figure:
    """The sweet spot as a function of the memory budget: predicted loss of the sweet spot and of
    the best dense model with their bootstrap bands (top), and their active and total parameters
    (bottom); each sweet spot is labelled with its expansion and granularity."""
    rs = sorted((_result(r) for r in results), key=lambda r: r["budget"]["memory"])
    rs = [r for r in rs if r.get("sweet_spot")]
    if not rs:
        raise ValueError("no search result has a sweet spot (every budget infeasible?)")
    unit, scale = _unit([r["budget"]["memory"] for r in rs])
    x = np.array([r["budget"]["memory"] for r in rs], float) / scale
    top_count = max(r["sweet_spot"]["params_total"] for r in rs)
    pname, pscale = next((n, v) for n, v in (("billions", 1e9), ("millions", 1e6), ("thousands", 1e3),
                                              ("", 1.0)) if top_count >= v)
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
    top.set_title(f"Sweet spot vs memory budget\n({_tokens_note(rs[0]['budget'])}"
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
    _log_axis(bottom, "y")
    bottom.set_xlabel(_memory_label(rs[0]["budget"], unit, "memory budget"))
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.2)
    return fig


def iso_loss_grid(fit: Any, result: Any, *, expansion_max: float = 64.0,
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
    import dataclasses

    r = _result(result)
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
        line = _config_line(cfg, n, b["weights"])
        X = {"params_active": line["params_active"], "params_total": line["params_total"],
             "params_embedding": line["params_embedding"], "tokens": np.full(n.shape, tokens),
             "expansion": E, "granularity": np.full(n.shape, G[i]),
             "n_shared": np.full(n.shape, float(cfg.n_shared))}
        ok = n >= cfg.top_k * (1 - 1e-9)       # at least top_k experts (E * G >= top_k)
        Z[i] = np.where(ok, np.asarray(fit.predict(X), float), np.nan)
        M[i] = np.where(ok, line["weight_bytes"] + float(s["kv_cache_bytes"]), np.nan)
    return {"E": E, "G": G, "loss": Z, "memory": M, "base": base, "sweet_spot": s, "budget": b}


def iso_loss_contours(fit: Any, result: Any, *, expansion_max: float = 64.0,
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
    ax.set_title(f"{_law_name(fit)}: iso-loss at d_model {base.d_model} x {base.n_layers} layers{shared}, "
                 f"~{format_count(s['params_active'])} active, {format_count(tokens)} tokens"
                 + ("\n(this law does not read granularity: contours are vertical)" if blind else ""),
                 fontsize="medium")
    return fig


def _budget_tag(r: Mapping[str, Any]) -> str:
    return format_bytes(r["budget"]["memory"]).replace(" ", "")


def fit_figures(fit: Any, *, runs: pd.DataFrame | None = None, results: Sequence[Any] = (),
                heldout: Sequence[str] | None = None) -> dict[str, Figure]:
    """The standard figures of a fit and its sweet-spot searches.

    With ``runs`` (the table the law was fitted on: a sweep's runs table, or any table with the
    canonical columns and ``loss``; only :func:`fitted_rows` are drawn): ``predicted_vs_observed``, ``residuals`` (``heldout`` run ids
    highlighted; default :func:`fit_heldout`) and, when the table carries model configs,
    ``law_curves``. For each search result (``SearchResult`` or its dict; those without a sweet
    spot are skipped): ``frontier_memory_<budget>`` and ``iso_loss_<budget>`` (e.g.
    ``frontier_memory_2GB``); for the first also ``frontier_flops_<budget>`` and, when its frontier
    is on their scale, ``published_models``; with two or more budgets, ``optimum_vs_budget``.
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
    rs = [_result(r) for r in results if r]
    rs = [r for r in rs if r.get("sweet_spot")]
    for i, r in enumerate(rs):
        tag = _budget_tag(r)
        figs[f"frontier_memory_{tag}"] = frontier_figure(r)
        if i == 0:
            figs[f"frontier_flops_{tag}"] = frontier_figure(r, axis="flops")
            if _published_on_scale(r):
                figs["published_models"] = published_models_figure(r)
        figs[f"iso_loss_{tag}"] = iso_loss_contours(fit, r)
    if len(rs) >= 2:
        figs["optimum_vs_budget"] = optimum_vs_budget(rs)
    return figs
