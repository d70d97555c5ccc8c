"""docs/layout_forms.py and docs/layout_loops.py: the pre-registered rules that choose the layout law
(issue 23, item 2) and its closed loops' memory budgets (item 5)."""

import json
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
import layout_forms  # noqa: E402
import layout_loops  # noqa: E402


def _metrics(inside, held, *, identified=True, n_free=15, heldout_rmse=None):
    effects = {"identified": identified, "unmet": [] if identified else ["eta's interval reaches its bound 8"]}
    m = {"layout_effects": effects, "rmse_over_noise_floor": inside, "heldout_rmse_over_noise_floor": held,
         "n_free": n_free, "heldout_rmse": heldout_rmse if heldout_rmse is not None else held * 0.0145}
    return {**m, "unmet": layout_forms.unmet_targets(m)}


def test_unmet_targets_names_each_missed_item_2_target_and_passes_the_edges():
    assert layout_forms.unmet_targets(_metrics(1.5, 2.0)) == []                      # at the limits: met
    assert layout_forms.unmet_targets(_metrics(1.51, 2.0)) == [
        "in-sample RMSE 1.51 noise floors (at most 1.5)"]
    assert layout_forms.unmet_targets(_metrics(1.0, 2.01, identified=False)) == [
        "eta's interval reaches its bound 8", "held-out RMSE 2.01 noise floors (at most 2)"]
    bare = layout_forms.unmet_targets({"rmse_over_noise_floor": None})             # no law terms, no floor
    assert bare == ["the law reads neither granularity nor the shared expert",
                    "in-sample RMSE None noise floors (at most 1.5)", "held-out RMSE None noise floors (at most 2)"]


def test_choose_takes_the_passing_form_with_fewest_free_coefficients_then_lower_heldout():
    forms = {"big": _metrics(1.0, 1.2, n_free=17), "small": _metrics(1.4, 1.9, n_free=15),
             "fails": _metrics(2.0, 1.0, n_free=14)}
    assert layout_forms.choose(forms)[0] == "small"
    forms["small2"] = _metrics(1.4, 1.8, n_free=15)
    name, why = layout_forms.choose(forms)
    assert name == "small2" and "fewest free coefficients (15)" in why


def test_choose_without_a_passing_form_prefers_identified_forms_by_heldout_rmse():
    forms = {"not identified": _metrics(1.0, 1.1, identified=False), "wide": _metrics(1.0, 2.5),
             "wider": _metrics(1.0, 3.0)}
    name, why = layout_forms.choose(forms)
    assert name == "wide" and "forms that identify the layout" in why
    none_identified = {k: _metrics(1.0, h, identified=False) for k, h in (("a", 1.3), ("b", 1.1))}
    name, why = layout_forms.choose(none_identified)
    assert name == "b" and "none identifies the layout" in why


def test_each_form_has_its_own_file_name():
    names = [layout_forms.slug(f) for f in layout_forms.FORMS]
    assert names == ["ondevice", "ondevice_width", "ondevice_shared_d", "layout_both"]


def test_choose_prefers_a_form_whose_loops_can_meet_item_5_then_item_2_alone():
    forms = {"monotone in G": _metrics(1.1, 1.2, n_free=15), "width": _metrics(1.2, 1.1, n_free=16),
             "both": _metrics(1.1, 1.4, n_free=17)}
    forms["monotone in G"]["unmet_loops"] = ["item 5 at C = 4.5e12: no plan passes"]
    forms["width"]["unmet_loops"] = forms["both"]["unmet_loops"] = []
    name, why = layout_forms.choose(forms)
    assert name == "width" and "item 5's binding targets" in why
    forms["width"]["unmet_loops"] = forms["both"]["unmet_loops"] = ["item 5 at C = 2.8e13: no plan passes"]
    name, why = layout_forms.choose(forms)
    assert name == "monotone in G" and "no form that does has plans passing" in why


def _plan(passed, steps, binding=("memory",), use=0.95, unmet=()):
    return {"verdict": {"passed": passed, "unmet": list(unmet)}, "steps": steps, "binding": list(binding),
            "memory_use": use}


def test_choose_budget_takes_the_cheapest_passing_plan_else_the_cheapest_where_memory_binds():
    bound = "the optimum sits on search-space bounds: granularity_max"
    plans = {"60KB": _plan(True, 300), "150KB": _plan(True, 200), "300KB": _plan(True, 200),
             "600KB": _plan(False, 100, binding=("space",), use=0.8, unmet=["neither memory nor latency binds"])}
    memory, why = layout_loops.choose_budget(plans)
    assert memory == "150KB" and why.startswith("the passing plan with the fewest steps (200)")
    plans = {"60KB": _plan(False, 300, unmet=[bound]), "150KB": _plan(False, 200, use=0.89, unmet=[bound]),
             "300KB": _plan(False, 250, unmet=[bound]), "600KB": _plan(False, 100, binding=("space",), unmet=["x"])}
    memory, why = layout_loops.choose_budget(plans)
    assert memory == "300KB" and why.startswith("no plan passes") and why.endswith(bound)
    assert layout_loops.choose_budget({"1MB": _plan(False, 9, binding=("space",))})[0] is None


def test_report_tabulates_trained_loops_and_plans_of_untrained_ones(tmp_path):
    moe = {"d_model": 32, "n_layers": 2, "d_ff": 128, "n_experts": 38, "d_expert": 64, "top_k": 1, "n_shared": 1,
           "d_shared": 64}
    dense = {"d_model": 48, "n_layers": 2, "n_experts": 1, "d_expert": 192, "top_k": 1, "n_shared": 0}
    row = {"name": "optimum", "also": ["g2"], "model": moe, "predicted_loss": 1.8015, "interval": [1.79, 1.82], "tokens": 5.0e6}
    trained = tmp_path / "c4.5e12"
    trained.mkdir()
    (tmp_path / "c1.5e12" / "plans").mkdir(parents=True)
    (trained / "budget.txt").write_text("300KB\n")
    (trained / "validation.json").write_text(json.dumps({
        "candidates": [{**row, "measured": [1.80, 1.81, 1.82], "measured_mean": 1.81, "measured_std": 0.01}],
        "noise_floor": 0.01, "optimum_gap": 0.0, "concordance": 1.0, "within_interval": 1.0, "spearman": None,
        "extrapolation": 0.11, "binding": ["memory"], "memory_use": 0.977,
        "verdict": {"passed": False, "unmet": ["concordance: not judged"]}}))
    planned = tmp_path / "c3.2e13"
    (planned / "plans").mkdir(parents=True)
    (planned / "budget.txt").write_text("400KB\n")
    (planned / "plans" / "400KB.json").write_text(json.dumps({
        "candidates": [{**row, "name": "best_dense", "also": [], "model": dense, "interval": None,
                        "measured": []}],
        "steps": 330960, "seeds": 3, "extrapolation": 0.32, "binding": ["memory"], "memory_use": 0.996,
        "verdict": {"passed": True, "unmet": []}}))
    text = layout_loops.report(tmp_path)
    trained_row = ("| 4.5e12 | 300KB | optimum (= g2) | d32 x 2, 38 x 64 top-1 + 1 shared x 64 (G2, E19) | 5.0M | "
                   "1.8015 [1.7900, 1.8200] | 1.8100 +- 0.0100 (3 seeds) |")
    planned_row = "| 3.2e13 | 400KB | best_dense | d48 x 2, dense | 5.0M | 1.8015 | not trained yet |"
    assert trained_row in text and planned_row in text
    assert text.index(trained_row) < text.index(planned_row)            # by compute, not by folder name
    assert "optimum_gap 0.0000, concordance 1.00, within_interval 1.00, Spearman -" in text
    assert "unmet targets: concordance: not judged." in text
    assert "planned, not trained (330,960 optimizer steps over 3 seeds)" in text
    assert "1.5e12" not in text                                       # no budget chosen there yet


def test_the_third_loop_is_at_least_twice_the_fitted_compute():
    """Twice the law's largest training compute, rounded up to two significant digits: its
    extrapolation is at least 2 and less than 10% above it; the loops' computes read it from the fit."""
    assert layout_loops.beyond(1.5848e13) == "3.2e13"         # the 360 runs' largest, 3x-forward
    assert layout_loops.beyond(1.41e13) == "2.9e13"
    assert layout_loops.beyond(1.5e13) == "3e13"              # exact: not rounded up past it
    assert layout_loops.beyond(4.99e13) == "1e14"
    for largest in np.geomspace(1e11, 1e16, 97):
        assert 2 * largest <= float(layout_loops.beyond(largest)) < 2 * largest * 1.1
    fit = types.SimpleNamespace(metrics={"max_train_compute": {"6N": 1.3e13, "3x-forward": 1.5848e13}})
    assert layout_loops.computes(fit) == ("1.5e12", "4.5e12", "3.2e13")
