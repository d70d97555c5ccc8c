"""The closed loop (``moe-fit --validate``): candidates named by the search, trained for real."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from moe_scaling.cli import fit as cli
from moe_scaling.config import ModelConfig
from moe_scaling.design.space import Budget
from moe_scaling.design.validate import (STUDY_SPACE, _best_per_line, concordance, model_shape, space_bounds, summarize,
                                         validate, verdict, validation_candidates)
from conftest import REPO
from moe_scaling.laws.published import published_fit
from moe_scaling.laws.registry import LAWS

LAW = published_fit("saturating", dict(c=1.2, A=30.0, alpha=0.3, delta=0.15, B=200.0, beta=0.35, E_start=2.0,
                                       E_max=100.0), "test coefficients")


def test_candidates_are_the_optimum_runners_up_and_named_alternatives():
    """In the study space the optimum comes first and the runners-up follow in predicted order, all
    at the space's preferred layout (G = 4, one shared expert: the law reads neither); every named
    alternative is what its name says, and no model is listed twice."""
    named = validation_candidates(LAW, Budget(memory=2_000_000, train_compute=5e12, context=128))
    by = {n.name: n.candidate for n in named}
    ranked = [n.candidate for n in named if n.role != "alternative"]
    assert [n.name for n in named[:3]] == ["optimum", "runner_up_1", "runner_up_2"]
    assert [c.predicted_loss for c in ranked] == sorted(c.predicted_loss for c in ranked)
    assert all((c.config.granularity, c.config.n_shared) == (4, 1) for c in ranked)
    assert not by["best_dense"].config.is_moe
    assert by["coarse_g1"].config.granularity == 1 and by["no_shared"].config.n_shared == 0
    assert by["g2"].config.granularity == 2
    assert "with_shared" not in by               # the best with a shared expert is the optimum: not repeated,
    assert "with_shared" in named[0].also        # but named beside it
    listed = {n.name for n in named} | {a for n in named for a in n.also}
    assert listed >= {"optimum", "runner_up_1", "runner_up_2", "best_dense", "coarse_g1", "g2", "finest_g",
                      "with_shared", "no_shared"}
    assert len({n.candidate.config for n in named}) == len(named)
    assert all(n.candidate.costs["total_bytes"] <= 2_000_000 for n in named)


# A law that reads granularity and the shared expert (ondevice: joint_moe's N term times
# (1 + g (G^-eta - 1)) (1 + n_shared)^-sigma), coefficients chosen so that both matter and the best
# layout (G = 4, no shared expert: sigma < 0) is not the study space's preferred one (G = 4 + shared).
LAYOUT_LAW = published_fit("ondevice", {**LAWS["ondevice"].reference, "g": 0.3, "eta": 0.8, "sigma": -0.1},
                           "test coefficients")


def test_when_the_law_reads_the_layout_the_optimum_is_its_argmin_over_every_layout():
    """No pinned layout: the optimum is the lowest prediction over every (trunk, layout) line, G and
    n_shared included, and the named alternatives cover G = 1, 2 and the largest G, with and without
    the shared expert, each the best of its kind and none predicted below the optimum."""
    budget = Budget(memory=2_000_000, train_compute=5e12, context=128)
    named = validation_candidates(LAYOUT_LAW, budget)
    every = _best_per_line(LAYOUT_LAW, budget, STUDY_SPACE)
    by = {n.name: n.candidate for n in named}
    assert by["optimum"].config == every[0][1] and by["optimum"].predicted_loss == every[0][0]
    # not the pinned layout: a search that fixed the knobs the law reads would give G = 4 + shared
    assert (by["optimum"].config.granularity, by["optimum"].config.n_shared) == (4, 0)
    assert STUDY_SPACE.shared[0] == 1 and by["with_shared"].predicted_loss > by["optimum"].predicted_loss
    assert all(c.predicted_loss >= by["optimum"].predicted_loss for c in by.values())
    want = {"coarse_g1": lambda c: c.granularity == 1, "g2": lambda c: c.granularity == 2,
            "finest_g": lambda c: c.granularity == max(STUDY_SPACE.granularities),
            "with_shared": lambda c: c.n_shared > 0, "no_shared": lambda c: c.n_shared == 0}
    configs = [n.candidate.config for n in named]
    also = {a: n.candidate for n in named for a in n.also}
    for name, pred in want.items():            # named, or the same model already listed under another name
        best = next(cfg for _, cfg, _ in every if cfg.is_moe and pred(cfg))
        assert (by.get(name) or also[name]).config == best, name
    assert len(set(configs)) == len(configs)


def test_a_law_that_sees_granularity_only_through_the_experts_width_reads_it():
    """``layout`` with no granularity factor (g = 0) still prices G through its narrow-expert factor
    (experts d_ff / G wide at a fixed width), so the search must vary G, not pin it."""
    from moe_scaling.design.search import law_reads

    p = {**LAWS["ondevice"].reference, "g": 0.0, "eta": 1.0, "sigma": 0.0, "w": 500.0, "rho": 1.0, "sigma_d": 0.0}
    assert law_reads(published_fit("layout", p, "test coefficients")) == {"granularity": True, "n_shared": False}
    assert law_reads(published_fit("layout", {**p, "w": 1e-3, "rho": 4.0}, "test")) == {"granularity": False,
                                                                                        "n_shared": False}


def test_space_bounds_and_concordance():
    cfg = validation_candidates(LAW, Budget(memory=2_000_000, train_compute=5e12, context=128))[0].candidate.config
    small = dataclasses.replace(STUDY_SPACE, d_model_min=cfg.d_model, n_layers_max=cfg.n_layers)
    assert {"d_model_min", "n_layers_max"} <= set(space_bounds(cfg, small))
    assert "granularity_max" in space_bounds(cfg, STUDY_SPACE)            # G = 4, the largest there
    roomy = dataclasses.replace(STUDY_SPACE, d_model_min=16, d_model_max=512, n_layers_min=1, n_layers_max=16,
                                expansion_max=1024.0, granularities=(4, 8, 2, 1), aspect_min=1.0, aspect_max=512.0)
    assert space_bounds(cfg, roomy) == []
    # pairs told apart beyond 2 floors (0.1): (a,c) and (b,c) and (a,b)? |2.0-2.15| = 0.15 <= 0.2: no
    pred, meas = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.15, 2.5])
    assert concordance(pred, meas, 0.1) == 1.0
    assert concordance(pred[::-1], meas, 0.1) == 0.0 and concordance(pred, meas, 1.0) is None
    assert concordance(np.array([1.0, 3.0, 2.0]), meas, 0.1) == 0.5     # (a,c) agrees, (b,c) does not


def test_a_depth_rule_fixes_each_widths_depth_and_is_no_search_bound():
    """``ArchSpace.depth_rule``: every trunk's depth is the rule's (the largest listed width not above
    it; beyond the largest, its aspect ratio kept), so a depth-blind law cannot take the space's
    shallowest model; depth and aspect are then not search bounds. A malformed rule is one error."""
    from moe_scaling.design.space import ArchSpace, trunks
    from moe_scaling.errors import ConfigError

    space = dataclasses.replace(STUDY_SPACE, d_model_min=16, d_model_max=320, n_layers_min=1, n_layers_max=8,
                                depth_rule=((24, 2), (96, 3), (160, 4)))
    got = {t.d_model: t.n_layers for t in trunks(space)}
    # (the study space's 16-wide heads in 2 KV groups keep widths that are multiples of 32)
    assert got == {32: 2, 64: 2, 96: 3, 128: 3, 160: 4, 192: 5, 224: 6, 256: 6, 288: 7, 320: 8}
    assert space.depth(16) == 2 and space.depth(80) == 2
    cfg = validation_candidates(LAW, Budget(memory=100_000, train_compute=5e12, context=128), space)[0].candidate.config
    assert cfg.n_layers == space.depth(cfg.d_model)
    assert not {"n_layers_min", "n_layers_max", "aspect_min", "aspect_max"} & set(space_bounds(cfg, space))
    for bad in (((96, 3), (24, 2)), ((24, 0),), ((24, 2, 1),), (24, 2)):
        with pytest.raises(ConfigError, match="space.depth_rule"):
            ArchSpace(depth_rule=bad)
    with pytest.raises(ConfigError, match="space.n_heads"):
        ArchSpace(n_heads=0)
    heads = dataclasses.replace(space, n_heads=4, kv_heads=(2,))
    assert {(t.d_model, t.head_dim) for t in trunks(heads)} == {(d, d // 4) for d in range(16, 321, 16)}


def test_validate_trains_the_candidates_and_writes_validation_json(tmp_path):
    """A budget that only the dense model fits (one candidate, one train step, one seed; each trained
    shape costs ~20 s of compilation on this machine): the candidate is really trained through the
    sweep runner and measured, and the file holds the verdict keys. The ranking of several
    candidates is tested above; the verdict arithmetic below."""
    space = dataclasses.replace(STUDY_SPACE, d_model_min=32, d_model_max=32, n_layers_max=2, granularities=(1,),
                                shared=(0,), expansion_max=2.0)
    budget = Budget(memory=45_000, train_compute=3e8, context=128)
    r = validate(LAW, budget, tmp_path, seeds=1, space=space, data={"corpus": "stdlib", "seq_len": 128},
                 train={"eval_every": 50, "eval_batches": 1, "ckpt_every": 1000, "log_every": 10})
    doc = json.loads((tmp_path / "validation.json").read_text())
    assert doc == json.loads(json.dumps(r))
    assert {"budget", "candidates", "noise_floor", "spearman", "predicted_best_is_measured_best",
            "within_interval"} <= set(doc) and doc["budget"]["train_compute"] == 3e8
    (c,) = doc["candidates"]
    assert {"name", "role", "model", "predicted_loss", "interval", "measured", "measured_mean",
            "measured_std"} <= set(c)
    assert c["name"] == "optimum" and c["model"]["n_experts"] == 1 and c["tokens"] == 2048 and 0 < c["epochs"] < 1
    assert len(c["measured"]) == 1 and 1.0 < c["measured_mean"] < 6.0 and c["measured_std"] is None
    assert (tmp_path / "grid.yaml").is_file() and (tmp_path / "sweep" / "runs.parquet").is_file()
    assert doc["noise_floor"] is None and doc["spearman"] is None and doc["within_interval"] is None
    assert doc["optimum_gap"] == 0.0 and doc["concordance"] is None and doc["extrapolation"] is None
    assert doc["binding"] and set(doc["binding"]) <= {"memory", "flops_per_token", "latency_ms", "space"}
    assert 0 < doc["memory_use"] <= 1 and "d_model_max" in doc["space_bounds"]
    assert doc["verdict"] == verdict(doc) and not doc["verdict"]["passed"]      # one seed: nothing to judge by


def test_plan_writes_the_grid_and_trains_nothing(tmp_path, capsys):
    """``--plan``: the grid file of the candidates, their optimizer steps (tokens / (batch x seq_len),
    times the seeds in the total) and where the budget binds, before any compute is spent: no sweep
    folder, no validation.json."""
    budget = Budget(memory=2_000_000, train_compute=5e12, context=128)
    r = validate(LAW, budget, tmp_path, seeds=2, plan=True)
    named = validation_candidates(LAW, budget)
    assert r["planned"] is True and [c["name"] for c in r["candidates"]] == [n.name for n in named]
    assert all(c["measured"] == [] and c["measured_mean"] is None and c["steps"] == c["tokens"] // (16 * 128)
               for c in r["candidates"])
    assert r["steps"] == 2 * sum(c["steps"] for c in r["candidates"])
    assert [c["also"] for c in r["candidates"]] == [list(n.also) for n in named]
    from moe_scaling.config import DataConfig
    from moe_scaling.train.data import load_tokens
    train_tokens = len(load_tokens(DataConfig(corpus=str(REPO.parent / "shared" / "data" / "text" / "gutenberg"),
                                              seq_len=128))[0])
    assert all(c["epochs"] == pytest.approx(c["tokens"] / train_tokens, rel=1e-12) for c in r["candidates"])
    assert r["binding"] and 0 < r["memory_use"] <= 1 and isinstance(r["space_bounds"], list)
    assert (tmp_path / "grid.yaml").is_file()
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "validation.json").exists()
    # the corpus relative to the grid's folder (a run id hashes it as written), naming the same files
    import yaml
    from moe_scaling.sweep.grid import resolve_corpus
    corpus = yaml.safe_load((tmp_path / "grid.yaml").read_text())["data"]["corpus"]
    assert not Path(corpus).is_absolute()
    assert resolve_corpus(corpus, tmp_path) == str(REPO.parent / "shared" / "data" / "text" / "gutenberg")
    assert cli.main(["fits/joint_moe_published.json", "--budget-mem", "2MB", "--train-compute", "5e12",
                     "--context", "128", "--validate", str(tmp_path / "cli"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "planned, not trained:" in out and "optimum" in out and not (tmp_path / "cli" / "sweep").exists()
    assert cli.main(["fits/joint_moe_published.json", "--budget-mem", "2MB", "--train-compute", "5e12",
                     "--context", "128", "--validate", str(tmp_path / "cli"), "--plan", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["validation"]["candidates"]
    doubles = [c for c in listed if c["also"]]
    assert doubles and all(f"{c['name']} (= {', '.join(c['also'])})" in out for c in doubles)
    assert all(model_shape(c["model"]) in out for c in listed)
    assert r["verdict"] == verdict(r) and "targets (issue 23, item 5): " in out


def test_summary_numbers_follow_from_the_measurements():
    rows = [{"name": "optimum", "predicted_loss": 2.0, "measured": [2.10, 2.14], "in_interval": True},
            {"predicted_loss": 2.1, "measured": [2.05, 2.07], "in_interval": False},
            {"predicted_loss": 2.3, "measured": [2.30, 2.36], "in_interval": True},
            {"predicted_loss": 2.2, "measured": [], "in_interval": None}]              # not trained: left out
    s = summarize(rows)
    stds = [np.std(m, ddof=1) for m in ([2.10, 2.14], [2.05, 2.07], [2.30, 2.36])]
    assert s["noise_floor"] == pytest.approx(np.sqrt(np.mean(np.square(stds))))
    assert s["spearman"] == pytest.approx(0.5)                 # ranks (1, 2, 3) vs (2, 1, 3)
    assert s["predicted_best_is_measured_best"] is False and s["within_interval"] == pytest.approx(2 / 3)
    assert s["optimum_gap"] == pytest.approx(2.12 - 2.06)                # the optimum's mean minus the best
    # floor 0.031: pairs beyond 0.062 are (opt, c) and (b, c), both ordered as the law orders them
    assert s["concordance"] == 1.0


def test_verdict_names_every_unmet_item_5_target():
    """optimum_gap <= 1 noise floor, concordance >= 0.9, within_interval >= 0.8, memory or latency
    binding with >= 90% of the memory used (unless latency binds), no search-space bound; a target
    that cannot be judged is unmet; a plan is judged on the binding alone."""
    good = {"noise_floor": 0.01, "optimum_gap": 0.01, "concordance": 0.9, "within_interval": 0.8,
            "binding": ["memory"], "memory_use": 0.9, "space_bounds": []}
    assert verdict(good) == {"passed": True, "unmet": []}
    bad = {**good, "optimum_gap": 0.015, "concordance": 0.85, "within_interval": 0.75, "memory_use": 0.5,
           "space_bounds": ["d_model_min"]}
    assert verdict(bad)["unmet"] == ["optimum_gap 0.0150 = 1.50 noise floors (at most 1)", "concordance 0.85 (at least 0.9)",
                                     "within_interval 0.75 (at least 0.8)", "memory_use 50% (at least 90% where memory binds)",
                                     "the optimum sits on search-space bounds: d_model_min"]
    assert verdict({**good, "binding": ["latency_ms"], "memory_use": 0.5})["passed"]      # latency binds instead
    assert verdict({**good, "binding": ["space"]})["unmet"] == [
        "neither memory nor latency binds the optimum (binding: space)"]
    assert verdict({**good, "noise_floor": None, "concordance": None, "within_interval": None})["unmet"] == [
        "optimum_gap: not judged (needs the optimum measured and 2 or more seeds)",
        "concordance: not judged (no candidate pair differs by more than 2 noise floors)",
        "within_interval: not judged (the law gives no intervals: fit it with a bootstrap)"]
    assert verdict({"planned": True, "binding": ["memory"], "memory_use": 0.95, "space_bounds": []})["passed"]


@pytest.mark.parametrize("argv, message", [
    (["fits/joint_moe_published.json", "--budget-mem", "2MB", "--validate", "d"], "needs --budget-mem M and --train-compute C"),
    (["fits/joint_moe_published.json", "--seeds", "3"], "--seeds 3: only acts with --validate"),
    (["fits/joint_moe_published.json", "--workers", "4"], "--workers 4: only acts with --validate"),
    (["fits/joint_moe_published.json", "--like", "sweeps/layout_isoflop.yaml"], "--like sweeps/layout_isoflop.yaml: "
     "only acts with --validate"),
    (["fits/joint_moe_published.json", "--budget-mem", "2MB", "--train-compute", "5e12", "--validate", "d",
      "--workers", "0"], "--workers 0: must be at least 1"),
    (["fits/joint_moe_published.json", "--budget-mem", "2MB", "--plan"], "--plan: only acts with --validate"),
])
def test_validate_bad_input_is_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_validation_runs_train_like_the_isoflop_study():
    """The closed loop trains its candidates with the study's settings (norm_topk, dispatch, capacity
    factor), so a measured loss is comparable with the runs the law was fitted to on any backend; the
    grid file carries them and every other ModelConfig field comes from the candidate."""
    import yaml
    from pathlib import Path

    from moe_scaling.design.validate import STUDY_MODEL, STUDY_TRAIN, _grid_doc

    grid = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "ondevice_isoflop.yaml").read_text())
    assert {k: grid["model"][k] for k in STUDY_MODEL} == STUDY_MODEL
    assert {k: grid["train"][k] for k in STUDY_TRAIN} == STUDY_TRAIN
    named = validation_candidates(LAW, Budget(memory=2_000_000, train_compute=5e12, context=128))
    doc = _grid_doc(named, name="v", data={"corpus": "stdlib", "seq_len": 128}, train={"batch_size": 16}, seeds=2)
    assert doc["model"] == STUDY_MODEL and not set(STUDY_MODEL) & set(doc["zip"])
    assert doc["zip"]["d_model"] == [n.candidate.config.d_model for n in named]


def test_like_a_study_trains_the_candidates_as_its_runs_with_its_learning_rate_by_size():
    """``--like GRID``: the closed loop's grid takes the study's data, train and router settings and
    each candidate's lr from the study's rule (log lr linear in log N through its dense sizes, the end
    segment's power law beyond them), in a space around the study's sizes."""
    from moe_scaling.config import ModelConfig
    from moe_scaling.design.validate import _grid_doc, study_settings

    like = study_settings(REPO / "sweeps" / "layout_isoflop.yaml")
    assert like.train["batch_size"] == 8 and like.train["eval_every"] == 250 and "lr" not in like.train
    assert like.model == {"router": "softmax", "norm_topk": False}
    assert like.data["corpus"] == str(REPO.parent / "shared" / "data" / "text" / "gutenberg")
    size = lambda d, n: ModelConfig(vocab_size=256, d_model=d, n_layers=n, n_heads=4, n_kv_heads=2, max_seq_len=128)
    # the grid's own rows (its header: 3e-3 at N = 17,424, 1e-3 at N = 1,537,760, 1.86e-3 at d64)
    assert like.lr(size(24, 2)) == pytest.approx(3e-3, rel=1e-12)
    assert like.lr(size(64, 2)) == pytest.approx(1.86e-3, rel=1e-12)
    # beyond the largest size: 1e-3 (N / 1,537,760)^(ln(1e-3 / 1.12e-3) / ln(1,537,760 / 984,448))
    big = size(256, 8)
    from moe_scaling.costs import param_counts
    n = param_counts(big).active - param_counts(big).embedding
    slope = np.log(1e-3 / 1.12e-3) / np.log(1537760 / 984448)
    assert like.lr(big) == pytest.approx(1e-3 * (n / 1537760) ** slope, rel=1e-12) and like.lr(big) < 1e-3
    space = like.space()
    assert (space.d_model_min, space.d_model_max, space.n_layers_min, space.n_layers_max) == (16, 320, 1, 8)
    assert set(space.granularities) == {1, 2, 4, 8} and space.expansion_max == 32.0
    # depth follows the study's own sizes (one depth per width there), continued at d160's aspect ratio
    assert space.depth_rule == ((16, 2), (24, 2), (32, 2), (48, 2), (64, 2), (96, 3), (128, 4), (160, 4))
    named = validation_candidates(LAW, Budget(memory=2_000_000, train_compute=5e12, context=128), space)
    assert all(n.candidate.config.n_layers == space.depth(n.candidate.config.d_model) for n in named)
    # and the heads as its runs had them: 4 heads in 2 KV groups at every width
    assert (space.n_heads, space.kv_heads) == (4, (2,))
    assert all((n.candidate.config.n_heads, n.candidate.config.n_kv_heads) == (4, 2) for n in named)
    doc = _grid_doc(named, name="v", data=like.data, train={**like.train, "lr": 0.003}, seeds=3,
                    model=like.model, like=like)
    assert doc["model"] == like.model and doc["train"]["batch_size"] == 8
    assert doc["zip"]["lr"] == [float(f"{like.lr(n.candidate.config):.3g}") for n in named]
    assert len(set(doc["zip"]["lr"])) > 1


def test_model_shape_names_every_width():
    """One spelling of a candidate's model for every table (moe-fit --validate, the loops' README)."""
    moe = {"d_model": 32, "n_layers": 2, "d_ff": 128, "n_experts": 38, "d_expert": 64, "top_k": 1, "n_shared": 1,
           "d_shared": 64}
    assert model_shape(moe) == "d32 x 2, 38 x 64 top-1 + 1 shared x 64 (G2, E19)"
    assert model_shape({**moe, "n_shared": 0, "top_k": 2}) == "d32 x 2, 38 x 64 top-2 (G2, E19)"
    # the layout as ModelConfig counts it, fractional expansions to three digits
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=128, n_experts=201, d_expert=16, top_k=4)
    assert model_shape({**moe, "n_experts": 201, "d_expert": 16, "top_k": 4}) \
        == f"d32 x 2, 201 x 16 top-4 + 1 shared x 64 (G{cfg.granularity:g}, E{cfg.expansion:.3g})" \
        == "d32 x 2, 201 x 16 top-4 + 1 shared x 64 (G8, E25.1)"
    assert model_shape({"d_model": 48, "n_layers": 2, "n_experts": 1, "d_expert": 192, "top_k": 1, "n_shared": 0}) \
        == "d48 x 2, dense"
