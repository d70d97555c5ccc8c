"""The sweet-spot search: budgets, exactness of the expert lines, monotonicity, frontiers, TPE."""

import json
import math

import numpy as np
import pytest

from moe_scaling.cli._common import make_parser
from moe_scaling.cli.budget import add_budget_arguments, format_budget, run_budget
from moe_scaling.units import parse_flops, parse_latency_ms
from moe_scaling.config import load_model_config
from moe_scaling.errors import ConfigError
from moe_scaling.costs import (cost_summary, flops_per_token, kv_cache_bytes, param_counts, published_models,
                               roofline, weight_bytes)
from moe_scaling.laws.fit import Fit, load_fit
from moe_scaling.design.candidate import Candidate, FrontierPoint
from moe_scaling.design.report import budget_table, published_table
from moe_scaling.design.search import law_reads, search
from moe_scaling.design.space import ArchSpace, Budget, expert_line, layouts, trunks

from conftest import REPO

LAW = load_fit(REPO / "fits" / "joint_moe_published.json")     # Ludziejewski et al. 2025, published


class PrefersG4:
    """The published joint law plus a granularity term with its optimum at G = 4 (a law that reads G)."""

    def predict(self, X):
        return LAW.predict(X) + 0.01 * np.abs(np.log2(X["granularity"]) - 2.0)


PUBLISHED = published_models()
SMALL = ArchSpace(d_model_min=512, d_model_max=2048, d_model_step=128, n_layers_max=40, head_dims=(64,),
                  expansion_max=32)


# -- budgets --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(memory=0, tokens=1e12), "positive whole number"),
    (dict(memory=2 * 10**9), "exactly one"),
    (dict(memory=2 * 10**9, tokens=1e12, train_compute=1e21), "exactly one"),
    (dict(memory=2 * 10**9, tokens=1e12, latency_ms=10.0), "needs a device"),
    (dict(memory=2 * 10**9, tokens=1e12, weights="int3-x"), "unknown precision"),
    (dict(memory=2 * 10**9, tokens=-1.0), "positive number"),
    (dict(memory=2 * 10**9, tokens=1e12, device="no-such-phone"), "unknown"),
    (dict(memory=2 * 10**9, train_compute=1e21, compute_rule="5N"), "compute_rule"),
])
def test_bad_budgets_raise_one_line(kw, message):
    with pytest.raises(ConfigError) as err:
        Budget(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_parse_flops_and_latency():
    assert parse_flops("2G") == parse_flops("2e9") == parse_flops("2GFLOPs") == 2e9
    assert parse_latency_ms("30ms") == parse_latency_ms("0.03s") == pytest.approx(30.0)
    for bad in ("fast", "-1ms", "0"):
        with pytest.raises(ConfigError):
            parse_latency_ms(bad)
    with pytest.raises(ConfigError):
        parse_flops("2 zillion")


# -- the space ------------------------------------------------------------------------------


def test_space_is_hardware_friendly():
    space = ArchSpace()
    ts = list(trunks(space))
    assert len(ts) > 500
    for t in ts:
        assert t.d_model % 64 == 0 and t.head_dim in (64, 128) and (t.d_model // t.head_dim) % t.n_kv_heads == 0
        assert space.aspect_min <= t.d_model / t.n_layers <= space.aspect_max
        for G, s in layouts(space, t.d_model):
            cfg = space.moe(t, (G, s), 2 * G)
            assert cfg.d_expert % 64 == 0 and cfg.vocab_size == 128256
            assert cfg.d_active_ffn == cfg.d_ff           # active FFN width does not depend on the layout
    assert layouts(space, 1280)[0] == (8, 1)               # MobileMoE-L's layout is preferred


def test_expert_lines_equal_the_cost_model_exactly():
    budget = Budget(memory=4 * 10**9, tokens=1e12, device="snapdragon-8-gen-3")
    space = ArchSpace()
    rng = np.random.default_rng(0)
    ts = list(trunks(space))
    for k in rng.choice(len(ts), 12, replace=False):
        t = ts[k]
        for lay in [None] + layouts(space, t.d_model)[:3]:
            line = expert_line(space, t, lay, budget)
            for i in {0, line.n.size // 2, line.n.size - 1}:
                cfg = line.config(space, i)
                p = param_counts(cfg)
                assert (line.params_total[i], line.params_active[i], line.params_embedding[i]) == (
                    p.total, p.active, p.embedding)
                assert math.isclose(line.weight_bytes[i], weight_bytes(cfg, "int4"), rel_tol=1e-12)
                assert math.isclose(line.kv_cache_bytes[i], kv_cache_bytes(cfg, 4096, "int8"), rel_tol=1e-12)
                assert math.isclose(line.flops_forward[i], flops_per_token(cfg, 4096), rel_tol=1e-12)
                ms = 1e3 * max(line.read_bytes[i] / 76.8e9, line.flops_forward[i] / 45e12)
                assert math.isclose(ms, roofline(cfg, "snapdragon-8-gen-3")["decode_ms_per_token"], rel_tol=1e-12)
                assert cfg.expansion >= 1


# -- the search -----------------------------------------------------------------------------


def test_more_memory_never_gives_a_worse_sweet_spot():
    losses = []
    for gb in (0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 3.0):
        r = search(LAW, Budget(memory=int(gb * 1e9), tokens=1e12, flops_per_token=2e9), SMALL)
        s = r.sweet_spot
        assert s["total_bytes"] <= gb * 1e9 and s["flops_per_token_forward"] <= 2e9 and s["within_budget"]
        losses.append(s["predicted_loss"])
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]


def test_sweet_spot_dense_frontiers_and_binding():
    budget = Budget(memory=2 * 10**9, tokens=1e12, latency_ms=10.0, device="snapdragon-8-gen-3")
    r = search(LAW, budget, SMALL, frontier_points=25)
    s, d = r.sweet_spot, r.dense
    # the reported numbers are the cost model's, for the reported config
    cfg = s.config
    exact = cost_summary(cfg, weights="int4", kv="int8", context=4096, device="snapdragon-8-gen-3")
    for k in ("params_total", "params_active", "weight_bytes", "kv_cache_bytes", "total_bytes",
              "decode_ms_per_token"):
        assert s[k] == exact[k]
    assert s["decode_ms_per_token"] <= 10.0 and s["total_bytes"] <= 2e9
    assert d["n_experts"] == 1 and d["predicted_loss"] >= s["predicted_loss"]
    assert s["predicted_loss_interval"] is None and "no interval" in s["interval_note"]
    assert set(r.binding) <= {"memory", "latency_ms"} and r.binding
    # dropping the binding latency budget helps; a budget that does not bind changes nothing
    free = search(LAW, Budget(memory=2 * 10**9, tokens=1e12), SMALL)
    assert free.sweet_spot["predicted_loss"] <= s["predicted_loss"]
    # frontiers: increasing cost, strictly decreasing loss; the memory one runs past the budget
    for front, key in ((r.frontier, "total_bytes"), (r.frontier_flops, "flops_per_token_forward"),
                       (r.frontier_dense, "total_bytes")):
        assert 2 <= len(front) <= 26
        xs, ls = [p[key] for p in front], [p["predicted_loss"] for p in front]
        assert xs == sorted(xs) and all(b < a for a, b in zip(ls, ls[1:]))
    assert any(not p["within_budget"] for p in r.frontier) and max(p["total_bytes"] for p in r.frontier) <= 4e9
    assert all(p["total_bytes"] <= 2e9 and p["decode_ms_per_token"] <= 10.0 for p in r.frontier_flops)
    assert min(p["predicted_loss"] for p in r.frontier if p["within_budget"]) == pytest.approx(s["predicted_loss"])
    assert all(not p["is_moe"] for p in r.frontier_dense)
    # published models on the same axes, costed at the same precisions
    pub = {p["name"]: p for p in r.published}
    assert {"mobilemoe-l", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"} <= set(pub)
    assert pub["mobilemoe-l"]["total_bytes"] == cost_summary(PUBLISHED["mobilemoe-l"].config)["total_bytes"]
    json.dumps(r.to_dict())                                           # JSON-ready


def test_knobs_the_law_cannot_see_are_fixed_and_stated():
    assert law_reads(LAW) == {"granularity": False, "n_shared": False}
    r = search(LAW, Budget(memory=2 * 10**9, tokens=1e12, flops_per_token=2e9), SMALL)
    assert r.law["fixed_knobs"] == {"granularity": 8, "n_shared": 1}
    assert {"granularity", "n_shared"} <= set(r.law["not_distinguished"])
    s = r.sweet_spot
    assert (s["d_ff"] // s["d_expert"], s["n_shared"], s["top_k"], s["d_shared"]) == (8, 1, 4, s["d_ff"] // 2)
    # a law that reads granularity gets it searched, and finds its optimum
    g4 = search(PrefersG4(), Budget(memory=2 * 10**9, tokens=1e12, flops_per_token=2e9), SMALL)
    assert law_reads(PrefersG4())["granularity"] and "granularity" not in g4.law["fixed_knobs"]
    assert g4.sweet_spot["granularity"] == 4


def test_training_compute_sets_tokens_per_architecture():
    C = 1e21
    r = search(LAW, Budget(memory=2 * 10**9, train_compute=C), SMALL)
    s, d = r.sweet_spot, r.dense
    for p in (s, d):
        assert p["tokens"] == pytest.approx(C / (6 * p["params_non_embedding_active"]), rel=1e-12)
    r3 = search(LAW, Budget(memory=2 * 10**9, train_compute=C, compute_rule="3x-forward"), SMALL)
    s3 = r3.sweet_spot
    assert s3["tokens"] == pytest.approx(C / s3["flops_per_token_training"], rel=1e-12)


def test_tpe_is_deterministic_and_close_to_exhaustive():
    budget = Budget(memory=2 * 10**9, tokens=1e12, flops_per_token=2e9)
    space = ArchSpace(d_model_min=512, d_model_max=2048, d_model_step=128, n_layers_max=40, head_dims=(64,),
                      expansion_max=16)
    exact = search(LAW, budget, space, method="exhaustive")
    a = search(LAW, budget, space, method="tpe", seed=3, n_trials=120)
    b = search(LAW, budget, space, method="tpe", seed=3, n_trials=120)
    assert a.method == "tpe" and a.sweet_spot == b.sweet_spot and a.frontier == b.frontier
    assert exact.sweet_spot["predicted_loss"] <= a.sweet_spot["predicted_loss"] <= exact.sweet_spot["predicted_loss"] + 0.01


def test_a_budget_nothing_fits():
    r = search(LAW, Budget(memory=10**6, tokens=1e12), SMALL)
    assert r.sweet_spot is None and r.dense is None and r.binding == []
    assert "nothing fits" in budget_table([r])


# -- moe-fit's budget options -----------------------------------------------------------------


def parse(argv):
    parser = make_parser("moe-fit", "test", "")
    parser.add_argument("input")
    add_budget_arguments(parser)
    return parser.parse_args(["fits/x.json", *argv])


def test_run_budget_json_and_emit(tmp_path):
    args = parse(["--budget-mem", "1GB", "--budget-flops", "1.5G", "--tokens", "1e12",
                  "--emit", str(tmp_path / "phone")])
    out = run_budget(args, LAW)
    s = out["sweet_spot"]
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_experts", "top_k", "d_expert", "params_total",
              "params_active", "weight_bytes", "kv_cache_bytes", "predicted_loss", "predicted_loss_interval"):
        assert k in s
    assert isinstance(out["frontier"], list) and out["frontier"]
    assert load_model_config(tmp_path / "phone" / "model.yaml") == Candidate.from_dict(out).config
    assert json.loads((tmp_path / "phone" / "costs.json").read_text())["params_total"] == s["params_total"]
    text = format_budget(out)
    assert "sweet spot" in text and "best dense" in text and "law cannot see" in text
    assert run_budget(parse([]), LAW) == {} and format_budget({"law": "joint_moe"}) == ""


@pytest.mark.parametrize("argv, message", [
    (["--budget-flops", "2G"], "needs --budget-mem"),
    (["--emit", "d"], "needs --budget-mem"),
    (["--budget-mem", "2 GB!"], "not a memory size"),
    (["--budget-mem", "2GB", "--budget-latency", "30ms"], "needs --device"),
    (["--budget-mem", "2GB", "--tokens", "many"], "not a count"),
    (["--budget-mem", "2GB", "--interval-level", "1.5"], "interval-level"),
])
def test_run_budget_bad_input(argv, message):
    with pytest.raises(ConfigError, match=message):
        run_budget(parse(argv), LAW)


@pytest.mark.parametrize("argv", [
    ["--tokens", "1e12"], ["--train-compute", "1e21"], ["--weights", "int8"], ["--kv", "int4"],
    ["--device", "snapdragon-8-gen-3"], ["--context", "2048"], ["--vocab", "32000"],
    ["--compute-rule", "3x-forward"], ["--search-method", "tpe"], ["--search-seed", "1"],
    ["--interval-level", "0.8"],
])
def test_budget_options_without_budget_mem_are_refused(argv):
    """Each of these is ignored without a search; giving one alone is a mistake, not a no-op."""
    with pytest.raises(ConfigError) as err:
        run_budget(parse(argv), LAW)
    msg = str(err.value)
    assert msg.startswith(f"{argv[0]} {argv[1]}:") and "needs --budget-mem" in msg and "\n" not in msg


def test_moe_fit_refuses_an_ignored_budget_option_with_exit_2():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "moe_scaling.cli.fit", str(REPO / "fits" / "joint_moe_published.json"),
                        "--tokens", "1e12", "--json"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert "--tokens 1e12" in r.stderr and "--budget-mem" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_defaults_apply_when_options_are_not_given():
    """Options default to None (to detect 'given'); the budget still gets the stated defaults."""
    from moe_scaling.cli.budget import budget_from_args

    b = budget_from_args(parse(["--budget-mem", "2GB"]))
    assert (b.weights, b.kv, b.context, b.tokens, b.compute_rule) == ("int4", "int8", 4096, 1e12, "6N")


# -- typed hand-offs ---------------------------------------------------------------------------


def test_candidates_round_trip_through_their_json():
    r = search(LAW, Budget(memory=2 * 10**9, tokens=1e12, latency_ms=10.0, device="snapdragon-8-gen-3"), SMALL)
    s = r.sweet_spot
    assert isinstance(s, Candidate) and isinstance(r.frontier[0], FrontierPoint)
    d = r.to_dict()
    assert d["sweet_spot"] == s.to_dict() and d["frontier"][0] == r.frontier[0].to_dict()
    assert d["moe_advantage"] == r.dense.predicted_loss - s.predicted_loss
    back = Candidate.from_dict(json.loads(json.dumps(d)))        # a saved moe-fit --json
    assert back.config == s.config and back.to_dict() == s.to_dict()
    assert s["predicted_loss"] == s.predicted_loss and dict(s) == s.to_dict()   # reads as its JSON
    spot = s.to_dict()
    del spot["predicted_loss"]
    with pytest.raises(ConfigError, match="missing predicted_loss"):
        Candidate.from_dict(spot)


def test_build_from_fit_costs_each_candidate_once(tmp_path, monkeypatch):
    """One cost_summary call per described candidate (sweet spot, dense, each published model);
    the builder reuses the sweet spot's costs for costs.json."""
    import moe_scaling.design.builder as builder
    import moe_scaling.design.candidate as candidate

    calls = []

    def counting(*a, **kw):
        calls.append(a[0])
        return cost_summary(*a, **kw)

    def refuse(*a, **kw):
        raise AssertionError("build_from_fit recomputed the sweet spot's costs")

    monkeypatch.setattr(candidate, "cost_summary", counting)
    monkeypatch.setattr(builder, "cost_summary", refuse)
    budget = Budget(memory=10**9, tokens=1e12, flops_per_token=1.5e9)
    result, summary = builder.build_from_fit(LAW, budget, tmp_path / "m", space=SMALL)
    n_published = sum(m.config is not None for m in PUBLISHED.values())
    assert len(calls) == 2 + n_published
    assert json.loads((tmp_path / "m" / "costs.json").read_text()) == result.sweet_spot.costs
    assert load_model_config(tmp_path / "m" / "model.yaml") == result.sweet_spot.config
    assert summary["params_total"] == result.sweet_spot.costs["params_total"]
    with pytest.raises(ConfigError, match="nothing in the space"):
        builder.build_from_fit(LAW, Budget(memory=10**6, tokens=1e12), tmp_path / "none", space=SMALL)
    assert not (tmp_path / "none").exists()


# -- the published joint law on phone budgets (README table) -----------------------------------


def test_published_law_on_1_2_4_gb_int4():
    """INT4 weights, INT8 KV cache at 4096 tokens, 1e12 training tokens. Memory alone: the published
    law fills the budget with a dense model. With a decode budget of 8 ms/token on a Snapdragon 8
    Gen 3 (MobileMoE-L's roofline decode there is 7.7 ms), the sweet spots are MobileMoE-style MoEs
    that beat the best dense model of the same budget."""
    for gb in (1, 2, 4):
        mem = search(LAW, Budget(memory=gb * 10**9, tokens=1e12))
        assert mem.sweet_spot["n_experts"] == 1 and mem.binding == ["memory"]
        r = search(LAW, Budget(memory=gb * 10**9, tokens=1e12, latency_ms=8.0, device="snapdragon-8-gen-3"))
        s, d = r.sweet_spot, r.dense
        assert s["n_experts"] > 1 and 1 < s["expansion"] <= 16, s["expansion"]
        assert 0.2e9 <= s["params_active"] <= 1.05e9 and 1e9 <= s["params_total"] <= 7e9
        assert s["total_bytes"] <= gb * 1e9 and s["decode_ms_per_token"] <= 8.0
        assert s["predicted_loss"] < d["predicted_loss"] and set(r.binding) == {"memory", "latency_ms"}
        assert (s["granularity"], s["n_shared"], s["router"]) == (8, 1, "sigmoid")
    table = published_table(r)
    assert "mobilemoe-l" in table and "7.7" in table and "olmoe-1b-7b" in table


def test_bootstrap_interval_is_reported_when_the_fit_has_samples():
    rng = np.random.default_rng(0)
    names = list(LAW.params)
    base = np.array([LAW.params[n] for n in names])
    samples = base * (1 + 0.01 * rng.standard_normal((40, len(names))))
    fit = Fit(law="joint_moe", params=dict(LAW.params), samples=samples)
    s = search(fit, Budget(memory=2 * 10**9, tokens=1e12, flops_per_token=2e9), SMALL, level=0.8).sweet_spot
    lo, hi = s["predicted_loss_interval"]
    assert lo < s["predicted_loss"] < hi and s["interval_level"] == 0.8 and "interval_note" not in s
