"""The closed loop (``moe-fit --validate``): candidates named by the search, trained for real."""

import dataclasses
import json

import numpy as np
import pytest

from moe_scaling.cli import fit as cli
from moe_scaling.design.space import Budget
from moe_scaling.design.validate import STUDY_SPACE, summarize, validate, validation_candidates
from moe_scaling.laws.fit import published_fit

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
    assert len({n.candidate.config for n in named}) == len(named)
    assert all(n.candidate.costs["total_bytes"] <= 2_000_000 for n in named)


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
    assert c["name"] == "optimum" and c["model"]["n_experts"] == 1 and c["tokens"] == 2048
    assert len(c["measured"]) == 1 and 1.0 < c["measured_mean"] < 6.0 and c["measured_std"] is None
    assert (tmp_path / "grid.yaml").is_file() and (tmp_path / "sweep" / "runs.parquet").is_file()
    assert doc["noise_floor"] is None and doc["spearman"] is None and doc["within_interval"] is None


def test_summary_numbers_follow_from_the_measurements():
    rows = [{"predicted_loss": 2.0, "measured": [2.10, 2.14], "in_interval": True},
            {"predicted_loss": 2.1, "measured": [2.05, 2.07], "in_interval": False},
            {"predicted_loss": 2.3, "measured": [2.30, 2.36], "in_interval": True},
            {"predicted_loss": 2.2, "measured": [], "in_interval": None}]              # not trained: left out
    s = summarize(rows)
    stds = [np.std(m, ddof=1) for m in ([2.10, 2.14], [2.05, 2.07], [2.30, 2.36])]
    assert s["noise_floor"] == pytest.approx(np.sqrt(np.mean(np.square(stds))))
    assert s["spearman"] == pytest.approx(0.5)                 # ranks (1, 2, 3) vs (2, 1, 3)
    assert s["predicted_best_is_measured_best"] is False and s["within_interval"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("argv, message", [
    (["fits/joint_moe_published.json", "--budget-mem", "2MB", "--validate", "d"], "needs --budget-mem M and --train-compute C"),
    (["fits/joint_moe_published.json", "--seeds", "3"], "--seeds 3: only acts with --validate"),
    (["fits/joint_moe_published.json", "--workers", "4"], "--workers 4: only acts with --validate"),
    (["fits/joint_moe_published.json", "--budget-mem", "2MB", "--train-compute", "5e12", "--validate", "d",
      "--workers", "0"], "--workers 0: must be at least 1"),
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
