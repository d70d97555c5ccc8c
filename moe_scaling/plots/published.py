"""The published models (MobileMoE, OLMoE, Mixtral, ...) on the memory and FLOPs axes, alone or
beside a search's predicted frontier (:func:`published_points`, :func:`published_models_figure`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moe_scaling.costs import flops_per_token, published_models, weight_bytes
from moe_scaling.plots.style import (SQUARE, WIDE, budget_note,
                                     label_points, log_axis, memory_axis_label, search_dict)
from moe_scaling.units import format_bytes, format_count


__all__ = ["published_points", "published_models_figure"]


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
    (:func:`published_points`). With a search result (the dict of ``SearchResult.to_dict()``, see
    :func:`moe_scaling.plots.style.search_dict`), the models and the predicted Pareto frontier are
    drawn on that search's axes (weights + KV cache at its precisions and context), the frontier
    coloured by predicted loss and the budget marked.
    """
    if result is None:
        pts = published_points(weights, context)
        pts = pts[pts["exact"]].rename(columns={"memory_bytes": "x_bytes"})
        xlabel = f"memory on device: weights at {weights.upper()} (GB, log scale)"
        frontier, budget = None, None
    else:
        r = search_dict(result)
        budget = r["budget"]
        context = budget["context"]
        pts = pd.DataFrame(r["published"]).rename(columns={"total_bytes": "x_bytes"})
        frontier = pd.DataFrame(r["frontier"])
        xlabel = memory_axis_label(budget, "GB")
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
                   label=f"memory budget {format_bytes(budget['memory'])}")
        ax.legend(loc="upper left", fontsize="small")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # room for the labels on the right of and below the points
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 2.5)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / 1.5, hi)
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"forward GFLOP per token at context {context} (log scale)")
    ax.set_title("Published MoE models on the cost axes"
                 + ("" if frontier is None else f" with the predicted frontier\n({budget_note(budget)})"),
                 fontsize="medium")
    ax.grid(True, which="both", alpha=0.2)
    avoid = ((frontier["total_bytes"] / 1e9, frontier["flops_per_token_forward"] / 1e9)
             if frontier is not None and len(frontier) else ((), ()))
    label_points(ax, x, y, names, fontsize="x-small", avoid=avoid)
    return fig


# --------------------------------------------------------------------------------------
# Training curves and expert load
# --------------------------------------------------------------------------------------
