"""The memory-only question (``moe-fit [INPUT] --budget-mem M``): the sweet spot across training-compute
budgets, where dense takes over, and the search choosing G and n_shared when the law reads them."""

import json

import numpy as np
import pytest

from conftest import REPO
from moe_scaling.cli import fit as cli
from moe_scaling.design.search import BY_COMPUTE_DEFAULT, law_reads, search, search_by_compute
from moe_scaling.design.space import ArchSpace, Budget
from moe_scaling.laws.fit import load_fit
from moe_scaling.laws.published import published_fit
from moe_scaling.laws.registry import LAWS

LAW = load_fit(REPO / "fits" / "joint_moe_published.json")     # Ludziejewski et al. 2025, published
SMALL = ArchSpace(d_model_min=512, d_model_max=2048, d_model_step=128, n_layers_max=40, head_dims=(64,),
                  expansion_max=32)
TINY = ArchSpace(d_model_min=512, d_model_max=1024, d_model_step=256, n_layers_max=24, head_dims=(64,),
                 expansion_max=16)
GB = 10 ** 9


@pytest.fixture(scope="module")
def by_memory():
    return {m: search_by_compute(LAW, Budget(memory=m * GB, tokens=1e12), space=SMALL) for m in (1, 2, 4)}


def test_moe_rows_exactly_where_the_law_prefers_moe(by_memory):
    """Each row's winner is the lower of its best MoE and best dense predictions; with the published
    joint law at 2 GB MoE wins at 1e19-1e20 FLOPs (memory in idle experts while compute is short)
    and dense from 1e21 on."""
    r = by_memory[2]
    assert [row.train_compute for row in r.rows] == list(BY_COMPUTE_DEFAULT)
    for row in r.rows:
        d = row.to_dict()
        moe_better = row.best_moe.predicted_loss < row.dense.predicted_loss
        assert d["winner"] == ("moe" if moe_better else "dense")
        assert d["predicted_loss"] == min(row.best_moe.predicted_loss, row.dense.predicted_loss)
        assert d["architecture"]["is_moe"] == moe_better and d["dense_loss"] == row.dense.predicted_loss
        assert 0 < d["architecture"]["active_ratio"] <= 1 and row.sweet_spot.costs["total_bytes"] <= 2 * GB
        # tokens follow the compute: D = C / (6 N_active_non_embedding)
        assert d["tokens"] == pytest.approx(row.train_compute / (6 * row.sweet_spot.costs["params_non_embedding_active"]))
    assert [row.winner for row in r.rows] == ["moe", "moe"] + ["dense"] * 5
    assert r.dense_takes_over == 1e21
    json.dumps(r.to_dict())


def test_a_row_is_the_single_search_at_that_compute(by_memory):
    row = by_memory[2].rows[1]                                           # 1e20 FLOPs
    single = search(LAW, Budget(memory=2 * GB, train_compute=1e20), SMALL)
    assert single.sweet_spot.config == row.sweet_spot.config
    assert single.sweet_spot.predicted_loss == row.sweet_spot.predicted_loss


def test_dense_takes_over_later_with_more_memory(by_memory):
    """More memory leaves MoE more room for idle experts, so dense takes over at a larger compute
    (1 GB: 1e21; 4 GB: not up to 1e25 in this space, whose largest dense model has 2.65B parameters)."""
    over = {m: (np.inf if r.dense_takes_over is None else r.dense_takes_over) for m, r in by_memory.items()}
    assert over[1] <= over[2] <= over[4] and over[1] < over[4]
    assert over[1] == 1e21 and by_memory[4].dense_takes_over is None
    # where best MoE and best dense cross (bisection between the rows): 1.5e20 at 1 GB, 9.3e20 at 2 GB;
    # 1% is the resolution of the crossover search (float64 NumPy on the published law, no XLA)
    cross = {m: r.crossover for m, r in by_memory.items()}
    assert 1e20 < cross[1] < cross[2] < 1e21 and cross[4] is None
    assert cross[1] == pytest.approx(1.52e20, rel=0.01) and cross[2] == pytest.approx(9.31e20, rel=0.01)
    for m in (1, 2):                                  # MoE still wins just below, dense just above
        below, above = (search_by_compute(LAW, Budget(memory=m * GB, tokens=1e12), [c], space=SMALL).rows[0]
                        for c in (cross[m] * 0.98, cross[m] * 1.02))
        assert below.winner == "moe" and above.winner == "dense"


@pytest.mark.parametrize("sigma, shared", [(0.1, 1), (-0.1, 0)])
def test_a_law_with_granularity_and_shared_terms_chooses_both(sigma, shared):
    """ondevice coefficients with a granularity gain (g > 0, eta > 0) and a shared-expert term: the
    search reads both knobs (nothing is fixed to MobileMoE-L's layout), takes the finest G the space
    allows at that width, and a shared expert exactly when the law rewards one (sigma > 0)."""
    law = published_fit("ondevice", {**LAWS["joint_moe"].reference, "g": 0.3, "eta": 1.0, "sigma": sigma}, "test")
    assert law_reads(law) == {"granularity": True, "n_shared": True}
    r = search(law, Budget(memory=GB, train_compute=1e20), TINY)
    assert r.law["fixed_knobs"] == {}
    s = r.sweet_spot
    assert s["n_shared"] == shared and s["granularity"] == 16


def test_moe_fit_budget_mem_alone_uses_the_default_fit_and_answers_by_compute(monkeypatch, capsys):
    monkeypatch.setattr(cli, "ArchSpace", lambda vocab_size: SMALL)
    assert cli.main(["--budget-mem", "2GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["default_fit"].endswith("fits/joint_moe_published.json") and "default fit" in out["notes"][0]
    bc = out["by_compute"]
    # the layout is chosen by Krajewski et al.'s published granularity factor on the joint law (issue
    # 23, item 6), named as a term of the law; at G = 16 it scales the parameter term of every MoE by
    # 1 + 0.104 (16^-0.58 - 1) = 0.917, so at 2 GB MoE now wins at every compute (the joint law
    # alone: dense from 1e21, test_moe_rows_exactly_where_the_law_prefers_moe), at the space's
    # largest G, 16
    terms = {t["law"]: t for t in bc["law_scope"]["terms"]}
    assert set(terms) == {"joint_moe", "krajewski", None} and "Krajewski et al. 2024" in terms["krajewski"]["source"]
    assert "sweet_spot" not in out and bc["dense_takes_over"] is None and len(bc["rows"]) == 7
    assert all(r["winner"] == "moe" and r["architecture"]["granularity"] == 16 for r in bc["rows"])
    assert bc["rows"][0]["architecture"]["expansion"] > 1
    assert cli.main(["--budget-mem", "2GB"]) == 0
    text = capsys.readouterr().out
    assert "sweet spot by training compute" in text and "law term granularity factor" in text


@pytest.mark.parametrize("argv, single", [
    (["--budget-mem", "2GB"], False), (["--budget-mem", "2GB", "--budget-flops", "2G"], False),
    (["--budget-mem", "2GB", "--tokens", "1e12"], True), (["--budget-mem", "2GB", "--train-compute", "1e21"], True),
    (["--budget-mem", "2GB", "--budget-latency", "8ms", "--device", "snapdragon-8-gen-3"], True),
])
def test_tokens_compute_or_latency_give_one_answer(argv, single):
    args = cli.build_parser().parse_args(["fits/x.json", *argv])
    assert cli.by_compute_wanted(args) is not single


@pytest.mark.parametrize("argv, message", [
    ([], "INPUT: give a sweep directory"),
    (["--budget-mem", "2GB", "--emit", "d"], "--emit: --budget-mem alone answers per training compute"),
])
def test_by_compute_bad_input_is_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_at_phone_scale_a_law_chooses_the_layout_and_the_space_bound_it_stops_at_is_named():
    """``layout_law``: an ondevice fit (reads G and n_shared) is used as it is; a joint_moe fit gets
    Krajewski et al.'s published granularity factor (G read, n_shared not: no published term); other
    laws are left alone. Under the factor the search's G is its argmin over the space's G values, and
    since the factor falls monotonically in G that is the space's largest: the result says so
    (``space_bounds``: granularity_max)."""
    from moe_scaling.laws.published import layout_law

    own = published_fit("ondevice", {**LAWS["joint_moe"].reference, "g": 0.3, "eta": 1.0, "sigma": 0.1}, "test")
    chinchilla = load_fit(REPO / "fits" / "chinchilla_epoch.json")
    assert layout_law(own) is own and layout_law(chinchilla) is chinchilla
    phone = layout_law(LAW)
    assert phone.law == "ondevice" and law_reads(phone) == {"granularity": True, "n_shared": False}
    budget = Budget(memory=2 * GB, tokens=1e12, latency_ms=8, device="snapdragon-8-gen-3")
    r = search(phone, budget, SMALL).to_dict()
    assert r["sweet_spot"]["granularity"] == max(SMALL.granularities) and "granularity_max" in r["space_bounds"]
    assert r["law_scope"]["fixed_knobs"] == {"n_shared": SMALL.shared[0]}
    one_less = ArchSpace(**{**SMALL.__dict__, "granularities": (8, 1, 2, 4)})
    assert search(phone, budget, one_less).to_dict()["sweet_spot"]["granularity"] == 8
    plain = search(LAW, budget, SMALL).to_dict()                       # the joint law alone: G fixed to 8
    assert plain["sweet_spot"]["granularity"] == 8 and "granularity_max" not in plain["space_bounds"]
