"""The look of every figure and the helpers the figure modules share.

Owns: writing a figure (:func:`save_figure`: PNG + reproducible SVG, atomically), the figure sizes,
the axis units (:func:`axis_unit` picks KB/MB/GB, kFLOP/.../TFLOP or thousands/millions/billions for
an axis from its data), log-axis ticks (:func:`log_axis`), colours and markers (:func:`palette`,
:func:`marker_map`), legends (:func:`legend_right`, :func:`legend_header`), label placement without overlaps
(:func:`label_points`), and the text shared by figures of searches and fits: a search's budget
(:func:`memory_axis_label`, :func:`budget_note`), a fitted law's name (:func:`law_name`), and the one
shape a search result is given in (:func:`search_dict`).

Counts, bytes and FLOPs in labels are written with :mod:`moe_scaling.units` (``format_count``,
``format_bytes``, ``format_flops``); there is no formatter here.

Figures are built without ``pyplot`` (no global figure registry, no backend switch; PNG/SVG are
written with Agg), so they are safe in scripts, tests and notebooks alike.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from moe_scaling.files import atomic_write_bytes
from moe_scaling.units import format_count, format_flops

__all__ = ["MARKERS", "BYTE_UNITS", "FLOP_UNITS", "COUNT_UNITS", "LOSS_LABEL", "WIDE", "SQUARE", "save_figure",
           "axis_unit", "log_axis", "label_points", "palette", "marker_map", "legend_right",
           "legend_header", "search_dict", "memory_axis_label", "budget_note", "law_name"]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "*", "<", ">")
# Axis scales (unit name, bytes or FLOPs per unit), largest first: an axis is drawn in one unit.
BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0))
FLOP_UNITS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3), ("FLOP", 1.0))
COUNT_UNITS = (("billions", 1e9), ("millions", 1e6), ("thousands", 1e3), ("", 1.0))
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
# Axes, colours, markers, legends, labels
# --------------------------------------------------------------------------------------


def axis_unit(values: Iterable[float], unit: str = "auto",
          units: Sequence[tuple[str, float]] = BYTE_UNITS) -> tuple[str, float]:
    """(unit name, scale): ``auto`` picks the largest of ``units`` the biggest value reaches."""
    if unit != "auto":
        table = dict(units)
        if unit not in table:
            raise ValueError(f"unit = {unit!r}: use one of auto, {', '.join(table)}")
        return unit, table[unit]
    top = max(values, default=1.0)
    return next(((n, s) for n, s in units if top >= s), units[-1])


def log_axis(ax, which: str = "x", fmt=lambda v: f"{v:g}") -> None:
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


def label_points(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str],
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


def palette(values: Sequence[float]) -> dict[float, Any]:
    """One colour per distinct value, in increasing order along viridis (its pale end left out)."""
    vals = sorted(set(float(v) for v in values))
    cmap = colormaps["viridis"]
    if len(vals) == 1:
        return {vals[0]: cmap(0.35)}
    return {v: cmap(0.85 * i / (len(vals) - 1)) for i, v in enumerate(vals)}


def marker_map(values: Sequence[float]) -> dict[float, str]:
    """One marker per distinct value, in increasing order (:data:`MARKERS`, cycled)."""
    vals = sorted(set(float(v) for v in values))
    return {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(vals)}


def legend_right(ax, handles: list, labels: list[str], headers: Iterable[str] = ()) -> None:
    """One legend outside the axes on the right; ``headers`` entries are set in bold."""
    leg = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                    fontsize="small", handletextpad=0.5, borderaxespad=0.0)
    headers = set(headers)
    for text in leg.get_texts():
        if text.get_text() in headers:
            text.set_fontweight("bold")


def legend_header(text: str) -> tuple[Line2D, str]:
    """An invisible legend handle and its text: a section header inside a legend."""
    return Line2D([], [], linestyle="none"), text


# --------------------------------------------------------------------------------------
# Text of searches and fits
# --------------------------------------------------------------------------------------


def search_dict(result: Any) -> Mapping[str, Any]:
    """``result`` when it is the one shape the search figures take: the dict of
    ``SearchResult.to_dict()`` (also what ``moe-fit ... --json`` prints; extra keys are ignored),
    so a saved result and a live one draw the same. Anything else is a TypeError: a caller holding
    a ``SearchResult`` calls ``.to_dict()`` first."""
    if not isinstance(result, Mapping):
        raise TypeError(f"a search result is drawn from its dict: pass {type(result).__name__}.to_dict(), "
                        "not the object")
    if "budget" not in result:
        raise ValueError("not a search result: no 'budget' key (give SearchResult.to_dict() or the "
                         "moe-fit --json output of a search)")
    return result


def memory_axis_label(budget: Mapping[str, Any], unit: str, what: str = "memory on device") -> str:
    """The label of a search's memory axis: what is counted (weights and KV cache at their
    precisions and context) and the axis unit."""
    return (f"{what}: weights {budget['weights'].upper()} + KV cache {budget['kv'].upper()} "
            f"at {budget['context']} tokens ({unit}, log scale)")


def budget_note(budget: Mapping[str, Any]) -> str:
    """Training tokens (or compute) and the budgets beyond memory, for a title."""
    if budget.get("tokens") is not None:
        note = f"{format_count(float(budget['tokens']))} training tokens"
    else:
        note = f"training compute {float(budget['train_compute']):.3g} FLOPs ({budget['compute_rule']})"
    if budget.get("flops_per_token"):
        note += f", <= {format_flops(float(budget['flops_per_token']))}/token"
    if budget.get("latency_ms"):
        note += f", decode <= {float(budget['latency_ms']):g} ms/token on {budget['device']}"
    return note


def law_name(fit: Any) -> str:
    """The name of ``fit``'s law for a title (``fitted law`` when it has none)."""
    law = getattr(fit, "law", None)
    return str(getattr(law, "name", law)) if law is not None else "fitted law"
