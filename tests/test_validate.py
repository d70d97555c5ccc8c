"""The closed loop (``moe-fit --validate``): candidates named by the search, trained for real."""

import dataclasses
import json

import numpy as np
import pytest

from moe_scaling.cli import fit as cli
from moe_scaling.design.space import Budget
from moe_scaling.design.validate import STUDY_SPACE, validate, validation_candidates
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
    """A tiny budget (two candidates, one train step each, two seeds): every candidate is trained,
    measured per seed, and the summary numbers follow from the measurements."""
    space = dataclasses.replace(STUDY_SPACE, d_model_min=32, d_model_max=32, n_layers_max=2, granularities=(1,),
                                shared=(0,), expansion_max=2.0)
    budget = Budget(memory=100_000, train_compute=3e8, context=128)
    r = validate(LAW, budget, tmp_path, seeds=2, space=space, data={"corpus": "stdlib", "seq_len": 128},
                 train={"eval_every": 50, "eval_batches": 1, "ckpt_every": 1000, "log_every": 10})
    doc = json.loads((tmp_path / "validation.json").read_text())
    assert doc == json.loads(json.dumps(r))
    assert {"budget", "candidates", "noise_floor", "spearman", "predicted_best_is_measured_best",
            "within_interval"} <= set(doc)
    assert [c["name"] for c in doc["candidates"]] == ["optimum", "runner_up_1"]
    for c in doc["candidates"]:
        assert {"name", "role", "model", "predicted_loss", "interval", "measured", "measured_mean",
                "measured_std"} <= set(c)
        assert len(c["measured"]) == 2 and all(np.isfinite(c["measured"]))
        assert c["measured_mean"] == pytest.approx(np.mean(c["measured"]))
        assert c["measured_std"] == pytest.approx(np.std(c["measured"], ddof=1))
    stds = [c["measured_std"] for c in doc["candidates"]]
    assert doc["noise_floor"] == pytest.approx(np.sqrt(np.mean(np.square(stds))))
    means = [c["measured_mean"] for c in doc["candidates"]]
    assert doc["predicted_best_is_measured_best"] == (int(np.argmin(means)) == 0)
    assert doc["within_interval"] is None                    # published coefficients: no interval


@pytest.mark.parametrize("argv, message", [
    (["fits/joint_moe_published.json", "--budget-mem", "2MB", "--validate", "d"], "needs --budget-mem M and --train-compute C"),
    (["fits/joint_moe_published.json", "--seeds", "3"], "--seeds 3: only acts with --validate"),
])
def test_validate_bad_input_is_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
