"""docs/layout_forms.py: the pre-registered rule that chooses the layout law (issue 23, item 2)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "layout_forms", Path(__file__).resolve().parents[1] / "docs" / "layout_forms.py")
layout_forms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout_forms)


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
