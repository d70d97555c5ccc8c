"""Figures of training runs: a sweep's runs table and curves, and the published models.

Owns the run helpers (:func:`model_config_from_row`, :func:`with_costs`, :func:`completed`,
:func:`pareto_mask`, :func:`run_label`, :func:`config_line`), the cost-axis figures
(:func:`loss_vs_memory`, :func:`loss_vs_flops`), :func:`training_curves`,
:func:`expert_load_figure`, and the standard set of a sweep, :func:`sweep_figures`
(``moe-sweep plot``).

The visual encoding of runs, shared by the cost-axis figures:

* colour: expansion ``E`` (total routed expert width over ``d_ff``), one colour per value;
* marker: granularity ``G`` (``d_ff / d_expert``);
* filled markers: no shared expert; hollow markers: one or more shared experts;
* dense runs (``n_experts <= 1``): black crosses joined by a dashed reference line;
* the Pareto frontier (lowest loss at no more cost) as a step line.

Memory on device of a measured run is its weight bytes at the chosen precision (default INT4: 4.5
bits per weight with group-32 fp16 scales, docs/design.md, section 3), computed with
:func:`moe_scaling.costs.weight_bytes` from the row's ModelConfig fields. Byte and FLOP axes pick
their unit from the data (:func:`moe_scaling.plots.style.axis_unit`) and say it in the label.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moe_scaling.config import ModelConfig
from moe_scaling.costs import flops_per_token, param_counts, published_models, weight_bytes
from moe_scaling.plots.style import (FLOP_UNITS, LOSS_LABEL, WIDE, axis_unit, legend_header, legend_right, log_axis, marker_map,
                                     palette)
from moe_scaling.units import format_count

__all__ = [
    "model_config_from_row", "with_costs", "completed", "pareto_mask", "run_label", "config_line",
    "loss_vs_memory", "loss_vs_flops", "select_runs",
    "training_curves", "expert_load_figure", "balance_run", "sweep_figures",
]


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


def config_line(cfg: ModelConfig, n_experts: np.ndarray, weights: str = "int4") -> dict[str, np.ndarray]:
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


def _scatter_runs(ax, runs: pd.DataFrame, x: np.ndarray, loss: str, frontier_label: str) -> None:
    """Draw runs on ``ax`` with the shared encoding, dense reference and Pareto frontier; add the legend."""
    y = runs[loss].to_numpy(float)
    dense = runs["is_dense"].to_numpy(bool)
    moe = runs[~dense]
    colours = palette(moe["expansion"]) if len(moe) else {}
    markers = marker_map(moe["granularity"]) if len(moe) else {}
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
        h, t = legend_header("expansion E (colour)")
        handles.append(h); labels.append(t); headers.append(t)
        for e, c in colours.items():
            handles.append(Line2D([], [], linestyle="none", marker="o", color=c, markersize=7))
            labels.append(f"E = {e:g}")
        h, t = legend_header("granularity G (marker)")
        handles.append(h); labels.append(t); headers.append(t)
        for g, m in markers.items():
            handles.append(Line2D([], [], linestyle="none", marker=m, color="0.35", markersize=7))
            labels.append(f"G = {g:g}")
        h, t = legend_header("shared experts")
        handles.append(h); labels.append(t); headers.append(t)
        handles.append(Line2D([], [], linestyle="none", marker="o", color="0.35", markersize=7))
        labels.append("none (filled)")
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white",
                              markeredgecolor="0.35", markeredgewidth=1.4, markersize=7))
        labels.append(">= 1 (hollow)")
    legend_right(ax, handles, labels, headers)
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
    name, scale = axis_unit(kept["memory_bytes"], unit)
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.add_subplot()
    x = kept["memory_bytes"].to_numpy(float) / scale
    _scatter_runs(ax, kept, x, loss, "Pareto frontier\n(lowest loss at <= memory)")
    if published:
        _published_lines(ax, scale, weights)
    ax.set_xscale("log")
    log_axis(ax, "x")
    ax.set_xlabel(f"memory on device: weights at {weights.upper()} ({name}, log scale)")
    ax.set_title(f"Loss vs memory on device: {_title_note(runs, kept)}", fontsize="medium")
    return fig


def loss_vs_flops(runs: pd.DataFrame, *, loss: str = "eval_loss") -> Figure:
    """Loss vs forward FLOPs per token (log axis) with the Pareto frontier, same encoding as
    :func:`loss_vs_memory`. FLOPs come from the table's ``flops_per_token_forward`` column."""
    kept = with_costs(completed(runs, loss))
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.add_subplot()
    name, scale = axis_unit(kept["flops_per_token_forward"], units=FLOP_UNITS)
    x = kept["flops_per_token_forward"].to_numpy(float) / scale
    _scatter_runs(ax, kept, x, loss, "Pareto frontier\n(lowest loss at <= FLOPs)")
    ax.set_xscale("log")
    log_axis(ax, "x")
    ax.set_xlabel(f"forward FLOPs per token ({name}, log scale)")
    ax.set_title(f"Loss vs compute per token: {_title_note(runs, kept)}", fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------
# Published models on the cost axes
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
    h, t = legend_header("style")
    handles += [h, Line2D([], [], color="0.4", linewidth=0.9), Line2D([], [], color="0.4", linestyle="--",
                                                                        marker="o", markersize=3.5)]
    labels += [t, "train loss", "eval loss"]
    legend_right(ax, handles, labels, headers=[t, "run: final eval loss"] if info is not None else [t])
    if info is not None:
        ax.get_legend().set_title("run: final eval loss", prop={"size": "small", "weight": "bold"})
    ax.set_xscale("log")
    log_axis(ax, "x", format_count)
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


