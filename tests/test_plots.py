"""Figures: what each one draws is checked against the data it was given (points, frontier,
units, labels), text never overlaps, files are written as PNG and SVG, and the plot CLI works.

The run-table figures are drawn from the committed quickstart results (results/quickstart, made by
README's main command); set MOE_SCALING_SWEEP_DIR to draw them from another sweep folder.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.text import Text

from conftest import REPO
from moe_scaling import plots
from moe_scaling.costs import param_counts, published_models, weight_bytes

SWEEP = os.environ.get("MOE_SCALING_SWEEP_DIR", str(REPO / "results" / "quickstart"))


@pytest.fixture(scope="module")
def sweep():
    runs = pd.read_parquet(os.path.join(SWEEP, "runs.parquet"))
    curves = pd.read_parquet(os.path.join(SWEEP, "curves.parquet"))
    return runs, curves


def text_overlaps(fig):
    """Pairs of visible, non-empty texts whose drawn boxes intersect (a few pixels of slack)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
             and t.get_window_extent(renderer).width > 0]
    boxes = [(t.get_text(), t.get_window_extent(renderer).expanded(0.98, 0.9)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]


def scatter_points(ax):
    pts = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


# ----------------------------------------------------------------------------------------
# Pareto frontier
# ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_pareto_mask_is_the_set_of_undominated_points(points):
    cost, loss = np.array(points, float).T
    mask = plots.pareto_mask(cost, loss)
    for i in range(len(points)):
        dominated = np.any((cost <= cost[i]) & (loss <= loss[i]) & ((cost < cost[i]) | (loss < loss[i])))
        duplicate_before = np.any((cost[:i] == cost[i]) & (loss[:i] == loss[i]))
        # undominated points are on the frontier (one of exact duplicates), dominated ones are not
        assert mask[i] == (not dominated and not duplicate_before)
    best = np.argmin(loss)
    assert loss[mask].min() == loss[best]


# ----------------------------------------------------------------------------------------
# Run-table figures on the committed sweep
# ----------------------------------------------------------------------------------------


def test_rows_rebuild_the_exact_model_config(sweep):
    runs, _ = sweep
    for row in runs.to_dict("records"):
        cfg = plots.model_config_from_row(row)
        counts = param_counts(cfg)
        assert (counts.total, counts.active) == (row["params_total"], row["params_active"])
    costed = plots.with_costs(runs)
    first = plots.model_config_from_row(runs.iloc[0])
    assert costed["memory_bytes"].iloc[0] == weight_bytes(first, "int4")


def test_loss_vs_memory_draws_every_completed_run_and_the_frontier(sweep):
    runs, _ = sweep
    fig = plots.loss_vs_memory(runs)
    ax = fig.axes[0]
    done = plots.with_costs(plots.completed(runs))
    unit, scale = plots._unit(done["memory_bytes"])
    x = done["memory_bytes"].to_numpy() / scale
    y = done["eval_loss"].to_numpy()
    drawn = scatter_points(ax)
    # every completed run is drawn at (memory, loss); the frontier rings sit on the Pareto set
    for xi, yi in zip(x, y):
        assert np.any(np.isclose(drawn[:, 0], xi) & np.isclose(drawn[:, 1], yi))
    step = [l for l in ax.get_lines() if l.get_drawstyle() == "steps-post"][0]
    front = plots.pareto_mask(x, y)
    assert sorted(step.get_xdata()) == pytest.approx(sorted(x[front]))
    assert ax.get_xscale() == "log"
    assert f"({unit}, log scale)" in ax.get_xlabel() and "INT4" in ax.get_xlabel()
    assert "nats/token" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for e in sorted(set(done.loc[~done["is_dense"], "expansion"])):
        assert f"E = {e:g}" in labels
    for g in sorted(set(done.loc[~done["is_dense"], "granularity"])):
        assert f"G = {g:g}" in labels
    assert text_overlaps(fig) == []


def test_loss_vs_flops_uses_the_tables_forward_flops(sweep):
    runs, _ = sweep
    fig = plots.loss_vs_flops(runs)
    ax = fig.axes[0]
    done = plots.completed(runs)
    unit, scale = plots._unit(done["flops_per_token_forward"], units=plots.FLOP_UNITS)
    drawn = scatter_points(ax)
    for xi in done["flops_per_token_forward"] / scale:
        assert np.isclose(drawn[:, 0], xi).any()
    assert f"forward FLOPs per token ({unit}" in ax.get_xlabel()
    assert text_overlaps(fig) == []


def test_published_models_sit_at_their_exact_costs():
    fig = plots.published_models_figure()
    ax = fig.axes[0]
    drawn = scatter_points(ax)
    names = {t.get_text().split("\n")[0] for t in ax.texts}
    for name, pm in published_models().items():
        if pm.config is None:
            continue
        assert name in names
        assert np.isclose(drawn[:, 0], weight_bytes(pm.config, "int4") / 1e9).any()
    assert "GB" in ax.get_xlabel() and "GFLOP" in ax.get_ylabel()
    assert text_overlaps(fig) == []


def test_training_curves_and_expert_load(sweep):
    runs, curves = sweep
    ids = plots.select_runs(runs, 4)
    fig = plots.training_curves(curves, runs, ids)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2 * len(ids)           # train + eval line per run
    best = plots.completed(runs).sort_values("eval_loss").iloc[0]
    assert ids[0] == best["run_id"]
    assert text_overlaps(fig) == []

    row = plots.balance_run(runs)
    assert row is not None and row["top_k"] < row["n_experts"]
    load = np.array(json.loads(row["expert_load_per_layer"]))
    fig = plots.expert_load_figure(row)
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches])
    assert heights.sum() == pytest.approx(100.0 * load.shape[0], rel=1e-6)   # each layer sums to 100%
    balanced = [l for l in ax.get_lines() if l.get_linestyle() == "--"][0]
    assert balanced.get_ydata()[0] == pytest.approx(100.0 / load.shape[1])
    assert text_overlaps(fig) == []


def test_save_figure_writes_png_and_reproducible_svg(tmp_path):
    paths = plots.save_figure(plots.published_models_figure(), tmp_path / "pub")
    assert [p.name for p in paths] == ["pub.png", "pub.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ET.fromstring(paths[1].read_bytes())                      # well-formed SVG
    first = [p.read_bytes() for p in paths]
    plots.save_figure(plots.published_models_figure(), tmp_path / "pub")   # the same figure again
    assert [p.read_bytes() for p in paths] == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub.png", "pub.svg"]   # no temp files left


# ----------------------------------------------------------------------------------------
# The plot entry point
# ----------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_scaling.cli.plot", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_sweep_plot_cli_writes_the_standard_set(tmp_path, sweep):
    r = _cli(SWEEP, "--out", tmp_path / "plots", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["figures"]) == {"loss_vs_memory", "loss_vs_flops", "training_curves", "expert_load"}
    for png, svg in out["figures"].values():
        assert os.path.getsize(png) > 10_000 and os.path.getsize(svg) > 10_000


def test_sweep_plot_cli_bad_input_exits_2_with_one_line(tmp_path, sweep):
    r = _cli(tmp_path / "missing")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "runs.parquet" in r.stderr
    runs, _ = sweep
    bad = tmp_path / "nothing_completed"
    bad.mkdir()
    runs.assign(status="failed").to_parquet(bad / "runs.parquet")
    r = _cli(bad)
    assert r.returncode == 2 and "no completed runs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
