"""Figures: what each one draws is checked against the data it was given (points, frontier,
units, labels), text never overlaps, files are written as PNG and SVG, and the plot CLI works.

The run-table figures are drawn from the committed quickstart results (results/quickstart, made by
`moe-sweep run sweeps/quickstart.yaml`); set MOE_SCALING_SWEEP_DIR to draw them from another sweep folder.
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
from moe_scaling.plots import published as published_plots
from moe_scaling.plots import fits as fit_plots, runs as run_plots, search as search_plots, style
from moe_scaling.costs import param_counts, published_models, weight_bytes

SWEEP = os.environ.get("MOE_SCALING_SWEEP_DIR", str(REPO / "results" / "quickstart"))


@pytest.fixture(scope="module")
def sweep():
    runs = pd.read_parquet(os.path.join(SWEEP, "runs.parquet"))
    curves = pd.read_parquet(os.path.join(SWEEP, "curves.parquet"))
    return runs, curves


def text_overlaps(fig):
    """Text defects of a drawn figure: pairs of visible, non-empty texts whose boxes intersect (a
    few pixels of slack), and texts cut off by the figure's edge (paired with "outside")."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    drawn_ticks, all_ticks = set(), set()
    for ax in fig.axes:                       # tick labels are drawn only inside the view limits
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                labels = {id(tick.label1), id(tick.label2)}
                all_ticks |= labels
                if lo - 1e-9 * abs(hi) <= tick.get_loc() <= hi + 1e-9 * abs(hi):
                    drawn_ticks |= labels
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
             and (id(t) not in all_ticks or id(t) in drawn_ticks)
             and t.get_window_extent(renderer).width > 0]
    boxes = [(t.get_text(), t.get_window_extent(renderer).expanded(0.98, 0.9)) for t in texts]
    frame = fig.bbox
    cut = [(a, "outside") for a, b in boxes
           if b.x0 < frame.x0 - 1 or b.y0 < frame.y0 - 1 or b.x1 > frame.x1 + 1 or b.y1 > frame.y1 + 1]
    return cut + [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]


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
    mask = run_plots.pareto_mask(cost, loss)
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
        cfg = run_plots.model_config_from_row(row)
        counts = param_counts(cfg)
        assert (counts.total, counts.active) == (row["params_total"], row["params_active"])
    costed = run_plots.with_costs(runs)
    first = run_plots.model_config_from_row(runs.iloc[0])
    assert costed["memory_bytes"].iloc[0] == weight_bytes(first, "int4")


def test_loss_vs_memory_draws_every_completed_run_and_the_frontier(sweep):
    runs, _ = sweep
    fig = run_plots.loss_vs_memory(runs)
    ax = fig.axes[0]
    done = run_plots.with_costs(run_plots.completed(runs))
    unit, scale = style.axis_unit(done["memory_bytes"])
    x = done["memory_bytes"].to_numpy() / scale
    y = done["eval_loss"].to_numpy()
    drawn = scatter_points(ax)
    # every completed run is drawn at (memory, loss); the frontier rings sit on the Pareto set
    for xi, yi in zip(x, y):
        assert np.any(np.isclose(drawn[:, 0], xi) & np.isclose(drawn[:, 1], yi))
    step = [l for l in ax.get_lines() if l.get_drawstyle() == "steps-post"][0]
    front = run_plots.pareto_mask(x, y)
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
    fig = run_plots.loss_vs_flops(runs)
    ax = fig.axes[0]
    done = run_plots.completed(runs)
    unit, scale = style.axis_unit(done["flops_per_token_forward"], units=style.FLOP_UNITS)
    drawn = scatter_points(ax)
    for xi in done["flops_per_token_forward"] / scale:
        assert np.isclose(drawn[:, 0], xi).any()
    assert f"forward FLOPs per token ({unit}" in ax.get_xlabel()
    assert text_overlaps(fig) == []


def test_published_models_sit_at_their_exact_costs():
    fig = published_plots.published_models_figure()
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
    ids = run_plots.select_runs(runs, 4)
    fig = run_plots.training_curves(curves, runs, ids)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2 * len(ids)           # train + eval line per run
    best = run_plots.completed(runs).sort_values("eval_loss").iloc[0]
    assert ids[0] == best["run_id"]
    assert text_overlaps(fig) == []

    row = run_plots.balance_run(runs)
    assert row is not None and row["top_k"] < row["n_experts"]
    load = np.array(json.loads(row["expert_load_per_layer"]))
    fig = run_plots.expert_load_figure(row)
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches])
    assert heights.sum() == pytest.approx(100.0 * load.shape[0], rel=1e-6)   # each layer sums to 100%
    balanced = [l for l in ax.get_lines() if l.get_linestyle() == "--"][0]
    assert balanced.get_ydata()[0] == pytest.approx(100.0 / load.shape[1])
    assert text_overlaps(fig) == []


def test_save_figure_writes_png_and_reproducible_svg(tmp_path):
    paths = style.save_figure(published_plots.published_models_figure(), tmp_path / "pub")
    assert [p.name for p in paths] == ["pub.png", "pub.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ET.fromstring(paths[1].read_bytes())                      # well-formed SVG
    first = [p.read_bytes() for p in paths]
    style.save_figure(published_plots.published_models_figure(), tmp_path / "pub")   # the same figure again
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


# ----------------------------------------------------------------------------------------
# Fit and sweet-spot figures: a real fit of the committed sweep, real searches
# ----------------------------------------------------------------------------------------

TINY = dict(d_model_min=32, d_model_max=128, d_model_step=32, n_layers_min=1, n_layers_max=4,
            aspect_min=8.0, aspect_max=256.0, head_dims=(16,), kv_heads=(2,), granularities=(1, 2),
            shared=(0, 1), expansion_max=16.0, router="softmax", rope_theta=10000.0, max_seq_len=128)


@pytest.fixture(scope="module")
def fitted(sweep):
    """The notebook's few-run setting: joint_moe with a, alpha, delta free, the data term removed
    (one token budget) and the rest at the published reference; a small bootstrap."""
    from moe_scaling.laws.fit import fit_law
    from moe_scaling.laws.tables import load_runs
    from moe_scaling.laws.registry import get_law

    table, _ = load_runs(SWEEP)
    fixed = {k: v for k, v in get_law("joint_moe").reference.items() if k not in ("a", "alpha", "delta")}
    return fit_law("joint_moe", table, fix=fixed | {"b": 1e-6}, points_per_param=2, bootstrap=20, seed=0)


@pytest.fixture(scope="module")
def searched(sweep, fitted):
    from moe_scaling.design.search import search
    from moe_scaling.design.space import ArchSpace, Budget

    runs, _ = sweep
    space = ArchSpace(vocab_size=int(runs["vocab_size"].iloc[0]), **TINY)
    tokens = float(runs["tokens"].median())
    return [search(fitted, Budget(memory=m, tokens=tokens, context=128), space) for m in (250_000, 500_000)]


def test_expert_lines_are_exact_at_every_run(sweep):
    runs, _ = sweep
    for row in run_plots.completed(runs).to_dict("records"):
        cfg = run_plots.model_config_from_row(row)
        if not cfg.is_moe:   # expert lines are drawn for MoE runs only (a dense run has no expert count)
            continue
        line = run_plots.config_line(cfg, np.array([cfg.n_experts, cfg.n_experts + 3]))
        counts = param_counts(cfg)
        assert (line["params_total"][0], line["params_active"][0]) == (counts.total, counts.active)
        assert line["weight_bytes"][0] == pytest.approx(weight_bytes(cfg, "int4"), rel=1e-12)


def test_law_curves_pass_through_the_laws_prediction_of_each_run(sweep, fitted):
    runs, _ = sweep
    fig = fit_plots.law_curves(fitted, runs)
    ax = fig.axes[0]
    curves = [l for l in ax.get_lines() if len(l.get_xdata()) > 10]
    done = run_plots.completed(runs)
    pred = fitted.predict(fit_plots.law_inputs(done))
    moe = done["n_experts"].to_numpy() > 1
    # every MoE run's prediction lies on one of the curves (at its own expansion), up to the linear
    # interpolation between the curve's plotted points (a smooth curve in log E, sampled finely: < 2e-3)
    for e, p in zip(done["expansion"][moe], pred[moe]):
        assert min(abs(np.interp(np.log(e), np.log(c.get_xdata()), c.get_ydata()) - p) for c in curves) < 2e-3
    assert len(ax.collections) >= len(curves)          # a bootstrap band per curve
    assert text_overlaps(fig) == []


def test_diagnostics_mark_the_fits_own_heldout_runs(sweep, fitted):
    runs, _ = sweep
    held = fit_plots.fit_heldout(fitted, runs)
    assert len(held) == fitted.metrics["heldout_n"]
    done = run_plots.completed(runs)
    obs, pred = done["eval_loss"].to_numpy(), fitted.predict(fit_plots.law_inputs(done))
    fig = fit_plots.predicted_vs_observed(fitted, runs, heldout=held)
    ax = fig.axes[0]
    drawn = np.concatenate([l.get_xydata() for l in ax.get_lines() if l.get_marker() == "o"])
    assert sorted(map(tuple, drawn.round(9))) == sorted(zip(obs.round(9), pred.round(9)))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(f"held-out runs (n={len(held)})" in t and f"{fitted.metrics['heldout_rmse']:.4f}" in t for t in labels)
    assert text_overlaps(fig) == []
    fig = fit_plots.residuals(fitted, runs, heldout=held)
    res = np.concatenate([c.get_offsets()[:, 1] for c in fig.axes[0].collections])
    assert sorted(res) == pytest.approx(sorted(100 * (obs / pred - 1)))
    assert "(%)" in fig.axes[0].get_ylabel() and text_overlaps(fig) == []


def test_sweet_spot_figures(sweep, fitted, searched):
    r = searched[0]
    s = r.sweet_spot
    fig = search_plots.frontier_figure(r.to_dict(), zoom=None)
    ax = fig.axes[0]
    unit, scale = style.axis_unit([p["total_bytes"] for p in r.frontier] + [r.budget.memory])
    star = [l for l in ax.get_lines() if l.get_marker() == "*"][0]
    assert star.get_xydata()[0] == pytest.approx([s["total_bytes"] / scale, s["predicted_loss"]])
    assert [l for l in ax.get_lines() if l.get_linestyle() == ":"][0].get_xdata()[0] == pytest.approx(
        r.budget.memory / scale)
    assert f"({unit}, log scale)" in ax.get_xlabel()
    assert text_overlaps(fig) == []

    # the iso-loss plane is the law on exact architectures: at the sweet spot it is the sweet spot
    grid = search_plots.iso_loss_grid(fitted, r.to_dict(), points=5)
    assert grid["memory"].shape == grid["loss"].shape == (len(grid["G"]), 5)
    # centred on an MoE (the sweep's best MoE run, described on the budget's axes by optimize), the
    # plane at that run's (E, G) is exactly the law's prediction and the cost model's bytes
    from moe_scaling.design.candidate import describe
    from moe_scaling.design.space import Budget

    runs, _ = sweep
    best = run_plots.completed(runs).query("n_experts > top_k").sort_values("eval_loss").iloc[0]
    budget = Budget(memory=r.budget.memory, tokens=r.budget.tokens, context=128)
    moe = {"sweet_spot": describe(fitted, run_plots.model_config_from_row(best), budget).to_dict(),
           "budget": budget.to_dict()}
    m = moe["sweet_spot"]
    at = search_plots.iso_loss_grid(fitted, moe, expansions=[m["expansion"]], granularities=[1, 2, 4])
    i = list(at["G"]).index(m["granularity"])
    assert at["loss"][i, 0] == pytest.approx(m["predicted_loss"], rel=1e-12)
    assert at["memory"][i, 0] == pytest.approx(m["total_bytes"], rel=1e-12)
    fig = search_plots.iso_loss_contours(fitted, r.to_dict())
    assert text_overlaps(fig) == []

    fig = search_plots.optimum_vs_budget([x.to_dict() for x in searched])
    top = fig.axes[0]
    spot_line = [l for l in top.get_lines() if l.get_label().startswith("sweet spot")][0]
    assert list(spot_line.get_ydata()) == pytest.approx([x.sweet_spot["predicted_loss"] for x in searched])
    assert text_overlaps(fig) == []


def test_fit_plot_writes_the_standard_set(tmp_path, fitted, searched):
    from moe_scaling.cli.plot import fit_plot

    # as moe-fit calls it: the INPUT path (a sweep folder) and its result dicts
    written = fit_plot(fitted, tmp_path, runs=SWEEP, results=[r.to_dict() for r in searched])
    tags = [search_plots.budget_tag(r.to_dict()) for r in searched]
    searches = {"optimum_vs_budget", f"frontier_flops_{tags[0]}"} | {
        f"{k}_{t}" for t in tags for k in ("frontier_memory", "iso_loss")}
    assert set(written) == {"law_curves", "predicted_vs_observed", "residuals"} | searches
    for png, svg in written.values():
        assert os.path.getsize(png) > 10_000 and os.path.getsize(svg) > 10_000
    # a saved fit as INPUT has no runs: only the search figures
    assert set(fit_plot(fitted, tmp_path / "json", runs="fits/x.json",
                        results=[r.to_dict() for r in searched])) == searches


def test_search_figures_take_the_result_dict_and_draw_a_saved_one_the_same(tmp_path, searched):
    from moe_scaling.files import json_default

    live = searched[0].to_dict()
    saved = json.loads(json.dumps(live, default=json_default))    # as moe-fit --json prints it
    paths = [style.save_figure(search_plots.frontier_figure(d), tmp_path / name, formats=("svg",))[0]
             for d, name in ((live, "live"), (saved, "saved"))]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    # a moe-fit --json dict holds the fit summary too: the extra keys are ignored
    fig = search_plots.frontier_figure({"law": "joint_moe", "rmse": 0.01, **saved})
    assert fig.axes[0].get_xlabel() == search_plots.frontier_figure(live).axes[0].get_xlabel()
    # one shape: the SearchResult object itself is refused, with the fix in the message
    for draw in (search_plots.frontier_figure, lambda r: search_plots.optimum_vs_budget([r]),
                 published_plots.published_models_figure):
        with pytest.raises(TypeError, match="to_dict"):
            draw(searched[0])


def test_published_models_with_a_phone_search():
    from moe_scaling.laws.fit import load_fit
    from moe_scaling.design.search import search
    from moe_scaling.design.space import Budget

    law = load_fit(REPO / "fits" / "joint_moe_published.json")
    r = search(law, Budget(memory=2 * 10**9, tokens=1e12))
    fig = published_plots.published_models_figure(r.to_dict())
    ax = fig.axes[0]
    drawn = scatter_points(ax)
    for p in r.published:
        assert np.isclose(drawn[:, 0], p["total_bytes"] / 1e9).any()
    assert "KV cache INT8 at 4096 tokens (GB" in ax.get_xlabel()
    assert text_overlaps(fig) == []
    assert "published_models" in fit_plots.fit_figures(law, results=[r.to_dict()])


# ----------------------------------------------------------------------------------------
# The memory-only answer: best MoE and best dense across training-compute budgets
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def by_compute(fitted):
    """search_by_compute at the sweep's scale (250 KB): the published Joint-MoE law, under which
    dense takes over between 1e14 and 1e15 FLOPs here, and the quickstart fit, which has bootstrap
    intervals. Returned as moe-fit --json prints them (and the published one's ByCompute object)."""
    from moe_scaling.design.search import search_by_compute
    from moe_scaling.design.space import ArchSpace, Budget
    from moe_scaling.files import json_default
    from moe_scaling.laws.fit import load_fit

    space = ArchSpace(vocab_size=256, **TINY)
    budget = Budget(memory=250_000, tokens=1e6, context=128)       # tokens: ignored, C sets them
    law = load_fit(REPO / "fits" / "joint_moe_published.json")
    obj = search_by_compute(law, budget, [1e12, 1e13, 1e14, 1e15, 1e16], space)
    ours = search_by_compute(fitted, budget, [1e12, 1e14], space)
    as_json = lambda r: json.loads(json.dumps(r.to_dict(), default=json_default))
    return as_json(obj), as_json(ours), obj


def test_by_compute_figure_draws_the_table_and_marks_the_takeover(by_compute):
    from matplotlib.collections import PolyCollection

    pub, _, _ = by_compute
    assert [r["winner"] for r in pub["rows"]] == ["moe", "moe", "moe", "dense", "dense"]
    cross = pub["crossover"]
    assert 1e14 < cross < 1e15 and pub["dense_takes_over"] == 1e15
    # the whole moe-fit --json output is accepted (its by_compute value is drawn)
    fig = search_plots.by_compute_figure({"law": "joint_moe", "by_compute": pub})
    top, bottom = fig.axes
    rows = pub["rows"]
    C = [r["train_compute"] for r in rows]
    lines = {l.get_label(): l for l in top.get_lines()}
    assert list(lines["best MoE"].get_xdata()) == C and list(lines["best dense"].get_xdata()) == C
    assert list(lines["best MoE"].get_ydata()) == pytest.approx([r["best_moe"]["predicted_loss"] for r in rows])
    assert list(lines["best dense"].get_ydata()) == pytest.approx([r["dense_loss"] for r in rows])
    # the sweet spot at each compute is ringed; the advantage panel is dense - best MoE
    assert np.allclose(scatter_points(top), [[c, r["predicted_loss"]] for c, r in zip(C, rows)], rtol=1e-12)
    adv = [l for l in bottom.get_lines() if l.get_marker() == "o"][0]
    assert list(adv.get_ydata()) == pytest.approx([r["moe_advantage"] for r in rows])
    for ax in (top, bottom):                     # the takeover: a dotted line at the crossover
        assert [l.get_xdata()[0] for l in ax.get_lines() if l.get_linestyle() == ":"] == pytest.approx([cross])
    assert f"dense takes over: {cross:.2g} FLOPs" in " ".join(t.get_text() for t in top.get_legend().get_texts())
    assert top.get_xscale() == "log" and "training compute" in bottom.get_xlabel()
    assert not [c for c in top.collections if isinstance(c, PolyCollection)]   # published law: no band
    assert text_overlaps(fig) == []


def test_by_compute_bands_are_the_intervals_and_moe_fit_plot_writes_it(tmp_path, fitted, by_compute):
    from matplotlib.collections import PolyCollection

    pub, ours, obj = by_compute
    # a fit with a bootstrap: each curve's band runs through its rows' intervals
    fig = search_plots.by_compute_figure(ours)
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 and "bootstrap interval" in fig.axes[0].get_title()
    for band, key in zip(bands, ("best_moe", "dense")):
        v = band.get_paths()[0].vertices
        for r in ours["rows"]:
            lo, hi = r[key]["predicted_loss_interval"]
            at = v[np.isclose(v[:, 0], r["train_compute"]), 1]
            assert np.isclose(at, lo).any() and np.isclose(at, hi).any()

    # one shape: the ByCompute object is refused with the fix; moe-fit --plot writes the figure
    with pytest.raises(TypeError, match="to_dict"):
        search_plots.by_compute_figure(obj)
    from moe_scaling.cli.plot import fit_plot

    written = fit_plot(fitted, tmp_path, runs="fits/x.json", by_compute=pub)
    assert set(written) == {"by_compute_250KB"}
    assert all(os.path.getsize(p) > 10_000 for p in written["by_compute_250KB"])


def test_isoflop_minimum_between_the_sizes_is_the_parabolas_vertex():
    """Losses exactly quadratic in ln(params_active) around ln N* = ln 50,000 at one budget: the
    interior minimum is located at N* and its loss to round-off, from the lowest size and its two
    neighbours; a layout whose lowest loss is at an end gets none."""
    from moe_scaling.plots.isoflop import isoflop_minima

    params = np.array([20_000.0, 40_000.0, 80_000.0, 160_000.0])
    x0, rows = np.log(50_000.0), []
    for d, n in zip((16, 24, 32, 48), params):
        for arch, loss in (("dense", 1.8 + 0.05 * (np.log(n) - x0) ** 2), ("moe", 1.7 + 0.01 * np.log(n))):
            moe = arch == "moe"
            rows.append({"status": "completed", "eval_loss": loss, "d_model": d, "n_layers": 2, "params_active": n,
                         "flops_per_token_forward": 2 * n, "tokens": 1e12 / (6 * n), "n_shared": 0,
                         "n_experts": 8 if moe else 1, "top_k": 2 if moe else 1, "expansion": 4.0 if moe else 1.0,
                         "granularity": 2.0 if moe else 1.0, "seed": 0})
    m = isoflop_minima(pd.DataFrame(rows)).set_index("arch")
    assert m.loc["dense", "interior"] and m.loc["dense", "optimal_params"] == pytest.approx(50_000.0, rel=1e-9)
    assert m.loc["dense", "optimal_loss"] == pytest.approx(1.8, abs=1e-12)
    assert not m.loc["E4 G2 k2", "interior"] and np.isnan(m.loc["E4 G2 k2", "optimal_params"])


def test_layout_minima_are_each_layouts_best_size_against_denses():
    """The layout figure on the committed isoflop study: per budget, every MoE layout's isoFLOP
    minimum minus dense's (isoflop_minima), hollow where the layout's minimum sits at an end of its
    sizes (every MoE minimum there: the finding that motivated the layout study), and a band of
    +- 2 sqrt(2) pooled noise floors; the legend of the isoFLOP figure lists every layout of every
    panel."""
    from matplotlib.colors import to_rgba
    from moe_scaling.laws.noise import pooled_seed_sd
    from moe_scaling.plots.isoflop import isoflop_minima, layout_minima_figure

    runs = pd.read_parquet(REPO / "results" / "ondevice_isoflop" / "runs.parquet")
    m = isoflop_minima(runs)
    fig = layout_minima_figure(runs)
    ax = fig.axes[0]
    dense = m[m["arch"] == "dense"].set_index("budget")["best_loss"]
    moe = m[m["arch"] != "dense"]
    points = [c for c in ax.collections if c.get_offsets().shape[0]]
    assert len(points) == 3                                    # one marker set per budget
    labels = [t.get_text() for t in ax.get_xticklabels()]
    for b, col in zip(sorted(moe["budget"].unique()), points):
        rows = moe[moe["budget"] == b].set_index("arch")
        want = sorted((labels.index(a), rows.loc[a, "best_loss"] - dense[b]) for a in rows.index)
        got = col.get_offsets()
        np.testing.assert_allclose(got[:, 1], [w for _, w in want], rtol=1e-12)
        assert np.all(np.abs(got[:, 0] - [i for i, _ in want]) < 0.5)
        assert all(to_rgba(f)[3] == 0.0 for f in col.get_facecolors())        # hollow: no minimum is interior
    floor = pooled_seed_sd(runs.assign(loss=runs["eval_loss"]))["noise_floor"]
    band = next(p for p in ax.patches)
    assert band.get_y() == pytest.approx(-2 * np.sqrt(2) * floor) and band.get_height() == pytest.approx(4 * np.sqrt(2) * floor)


def test_isoflop_panels_group_runs_by_their_planned_budget():
    """The committed isoflop study: three budgets (1.5e12, 4.5e12, 1.35e13 planned), each run in
    the panel of its row's plain runs (a shared expert's extra compute does not move it), one line
    per architecture with one point per size; a sweep of one size per budget has no such figure."""
    from moe_scaling.plots.isoflop import compute_budgets, isoflop_figure

    runs = pd.read_parquet(REPO / "results" / "ondevice_isoflop" / "runs.parquet")
    budgets = compute_budgets(runs)
    levels = sorted(budgets.unique())
    assert len(levels) == 3
    assert [round(b / 1.5e12, 1) for b in levels] == [1.0, 3.0, 9.0]     # the grid's budgets, within rounding
    shared = runs["n_shared"] > 0
    own = 3 * runs["flops_per_token_forward"] * runs["tokens"]
    assert (own[shared] > 1.3 * budgets[shared]).all()                   # over budget, yet grouped with its row
    fig = isoflop_figure(runs)
    axes = fig.axes[:3]
    assert [len(ax.get_xticks()) for ax in axes] == [3, 4, 3]
    assert len(axes[-1].get_legend().get_texts()) == 6
    quick = pd.read_parquet(REPO / "results" / "quickstart" / "runs.parquet")
    assert isoflop_figure(quick) is None
    # the minima (issue 23's finding on this study): every MoE layout's lowest mean is at its budget's
    # smallest size, so no MoE minimum is bracketed; dense's is interior at the two larger budgets
    from moe_scaling.plots.isoflop import isoflop_minima
    m = isoflop_minima(runs)
    assert len(m) == 18 and sorted(m["budget"].unique()) == levels
    moe = m[m["arch"] != "dense"]
    assert not moe["interior"].any() and (moe["best_size"] == [s[0] for s in moe["sizes"]]).all()
    assert m[m["arch"] == "dense"]["interior"].tolist() == [False, True, True]
    from moe_scaling.plots.runs import run_label
    first = m.iloc[0]                                      # a mean over its seeds, by hand
    labels = pd.Series([run_label(r) for _, r in runs.iterrows()], index=runs.index)
    sel = (budgets == first["budget"]) & (runs["d_model"] == 48) & (labels == first["arch"])
    assert sel.sum() == first["seeds"][0] == 3
    assert first["losses"][0] == pytest.approx(runs.loc[sel, "eval_loss"].mean(), rel=1e-12)
