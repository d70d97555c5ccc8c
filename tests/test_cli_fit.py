"""``moe-fit`` as a user runs it: sweep folders, tables, saved fits, --predict/--out/--json, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA
from moe_scaling.laws.fit import load_fit
from moe_scaling.laws.registry import LAWS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # compiled kernels shared by this module's runs, kept out of the home directory
    return {**os.environ, "MOE_SCALING_JAX_CACHE": str(tmp_path_factory.mktemp("jax-cache"))}


def moe_fit(env, *args):
    return subprocess.run([sys.executable, "-m", "moe_scaling.cli.fit", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def _chinchilla_runs(n_n=6, n_d=5, seed=0):
    law = LAWS["chinchilla"]
    N, D = np.meshgrid(np.geomspace(3e7, 1e9, n_n), np.geomspace(1e9, 1e11, n_d))
    X = {"params_active": N.ravel(), "tokens": D.ravel()}
    loss = law.predict(law.reference, X) * np.exp(np.random.default_rng(seed).normal(0, 0.003, N.size))
    return pd.DataFrame({**X, "loss": loss})


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A sweep folder as moe-sweep writes it: runs.parquet with statuses and eval_loss."""
    d = tmp_path_factory.mktemp("sweep")
    runs = _chinchilla_runs().rename(columns={"loss": "eval_loss"})
    runs["status"] = "completed"
    runs.loc[4, "eval_loss"] = np.nan                                 # completed, but no loss: dropped
    bad = runs.iloc[:3].assign(status=["failed", "diverged", "running"], eval_loss=[np.nan, 9.9, np.nan])
    runs = pd.concat([runs, bad], ignore_index=True)
    runs["run_id"] = [f"r{i}" for i in range(len(runs))]
    runs.to_parquet(d / "runs.parquet")
    return d


def test_help_has_examples(env):
    r = moe_fit(env, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--law" in r.stdout and "joint_moe" in r.stdout


def test_sweep_directory_json_predict_and_out(env, sweep_dir, tmp_path):
    pred = pd.DataFrame({"params_active": [1e8, 3e9, 1e10], "tokens": [1e10, 3e11, 1e12]})
    pred.to_csv(tmp_path / "pred.csv", index=False)
    out = tmp_path / "fits" / "sweep.json"
    r = moe_fit(env, sweep_dir, "--law", "chinchilla", "--bootstrap", 30, "--kfold", 0, "--json",
                "--predict", tmp_path / "pred.csv", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["law"] == "chinchilla" and res["n_points"] == 29
    assert set(res["intervals"]) == set(res["params"]) == set(LAWS["chinchilla"].params)
    assert res["heldout_rmse"] > 0 and res["interval_level"] == 0.95
    assert len(res["metrics"]["heldout_run_ids"]) == res["metrics"]["heldout_n"] == 6
    assert "used the 30 completed of 33 runs (status column)" in res["notes"]
    assert any("dropped 1 rows with NaN/inf" in n for n in res["notes"])
    # 29 runs drawn from the reference law: alpha comes back to within its sampling error on so few
    # runs (bootstrap sd ~0.02 on alpha ~0.34, i.e. 6%); 10% is ~1.7 of those, not a machine's figure
    assert res["params"]["alpha"] == pytest.approx(LAWS["chinchilla"].reference["alpha"], rel=0.1)
    assert len(res["predictions"]) == 3 and res["prediction_interval_level"] == 0.9
    for v, (lo, hi) in zip(res["predictions"], res["prediction_intervals"]):
        assert lo <= v <= hi
    saved = load_fit(out)
    np.testing.assert_allclose(saved.predict({c: pred[c].to_numpy() for c in pred}), res["predictions"], rtol=1e-12)
    assert saved.settings["input"] == str(sweep_dir) and saved.samples.shape == (30, 5)


def test_predict_rows_take_their_noise_familys_floor(env, sweep_dir, tmp_path):
    """--predict passes each row's expansion and n_shared, so a row's interval for a new run uses its
    family's seed-noise floor (dense, a MoE layout with 10+ dof, else every MoE run's): the CLI's
    intervals equal Fit.predict_interval on the same rows, and the wider floors give wider intervals."""
    fitted = tmp_path / "fit.json"
    assert moe_fit(env, sweep_dir, "--law", "chinchilla", "--bootstrap", 10, "--kfold", 0, "--out", fitted).returncode == 0
    doc = json.loads(fitted.read_text())
    doc["metrics"] |= {"noise_floor": 0.02, "noise_floor_by_family": [
        {"family": "dense", "configs": 2, "dof": 4, "noise_floor": 0.004},
        {"family": "moe", "configs": 20, "dof": 40, "noise_floor": 0.03},
        {"family": "moe x16", "configs": 10, "dof": 20, "noise_floor": 0.06}]}
    fitted.write_text(json.dumps(doc))
    rows = pd.DataFrame({"params_active": [1e8] * 4, "tokens": [1e10] * 4, "expansion": [1.0, 16.0, 16.0, 4.0],
                         "n_shared": [0, 0, 1, 1]})
    rows.to_csv(tmp_path / "rows.csv", index=False)
    r = moe_fit(env, fitted, "--predict", tmp_path / "rows.csv", "--json")
    assert r.returncode == 0, r.stderr
    got = np.array(json.loads(r.stdout)["prediction_intervals"])
    want = load_fit(fitted).predict_interval({c: rows[c].to_numpy(float) for c in rows}, level=0.9)
    np.testing.assert_allclose(got, np.stack(want, axis=1), rtol=1e-12)
    width = got[:, 1] - got[:, 0]      # dense 0.004 < every MoE run's 0.03 (x16 + shared, x4 + shared: no floor of
    assert width[2] == pytest.approx(width[3], rel=1e-12)                           # their own) < x16's 0.06
    assert width[0] < width[2] < width[1]


def test_table_with_column_mapping_and_fix(env, tmp_path):
    runs = _chinchilla_runs().rename(columns={"params_active": "N", "tokens": "D", "loss": "final loss"})
    runs.to_csv(tmp_path / "runs.csv", index=False)
    r = moe_fit(env, tmp_path / "runs.csv", "--law", "chinchilla", "--column", "params_active=N",
                "--column", "tokens=D", "--column", "loss=final loss", "--fix", "beta=0.3672",
                "--bootstrap", 10, "--kfold", 0)
    assert r.returncode == 0, r.stderr
    assert "law chinchilla (fit)" in r.stdout and "(fixed)" in r.stdout and "held-out rmse" in r.stdout


def test_auto_reports_every_candidate(env, tmp_path):
    runs = pd.read_csv(SHARED_DATA / "clark2022_routing" / "curves.csv.gz")
    final = runs[runs["step"] == runs.groupby("hyper_id")["step"].transform("max")]
    s = final[(final["router_type"] == "S-Base") & (final["k"] == 1) & (final["routing_frequency"] == 0.5)]
    s[["loss_validation", "dense_parameter_count", "num_experts"]].to_csv(tmp_path / "clark.csv", index=False)
    r = moe_fit(env, tmp_path / "clark.csv", "--column", "loss=loss_validation", "--column",
                "params_active=dense_parameter_count", "--column", "expansion=num_experts",
                "--bootstrap", 20, "--kfold", 0, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    cands = {c["law"]: c for c in res["metrics"]["candidates"]}
    assert res["law"] == "clark" and set(cands) == {"chinchilla", "krajewski", "joint_moe", "clark", "saturating",
                                                    "ondevice"}
    assert cands["chinchilla"]["skipped"] == "no column tokens" and cands["clark"]["heldout_rmse"] > 0
    assert cands["saturating"]["skipped"] == "no column tokens"


def test_saved_published_fit_predicts_without_interval(env, tmp_path):
    X = pd.DataFrame({"params_active": [6e8, 1.2e9], "params_embedding": [1e8, 2e8], "tokens": [1e11, 1e12],
                      "expansion": [1.0, 8.0]})
    X.to_csv(tmp_path / "x.csv", index=False)
    r = moe_fit(env, REPO / "fits" / "joint_moe_published.json", "--predict", tmp_path / "x.csv", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    want = LAWS["joint_moe"].predict(LAWS["joint_moe"].reference, {c: X[c].to_numpy() for c in X})
    np.testing.assert_allclose(res["predictions"], want, rtol=1e-12)
    assert res["source"] == "published" and res["prediction_intervals"] is None
    assert "no bootstrap samples" in res["prediction_interval_note"]


def _write(tmp_path, name, df):
    df.to_csv(tmp_path / name, index=False)
    return tmp_path / name


BAD = {
    "constant loss": (lambda t: [_write(t, "c.csv", _chinchilla_runs().assign(loss=2.5)), "--law", "chinchilla"],
                      "column 'loss' is constant"),
    "too few points": (lambda t: [_write(t, "f.csv", _chinchilla_runs().iloc[:4]), "--law", "chinchilla"],
                       "too few points for law chinchilla"),
    "missing column": (lambda t: [_write(t, "m.csv", _chinchilla_runs().drop(columns="tokens")), "--law", "chinchilla"],
                       "column 'tokens' missing"),
    "unknown law": (lambda t: [_write(t, "u.csv", _chinchilla_runs()), "--law", "kaplan"], "unknown law 'kaplan'"),
    "fix syntax": (lambda t: [_write(t, "s.csv", _chinchilla_runs()), "--fix", "alpha"], "write NAME=VALUE"),
    "fix unknown": (lambda t: [_write(t, "k.csv", _chinchilla_runs()), "--law", "chinchilla", "--fix", "gamma=1"],
                    "no parameter 'gamma'"),
    "fix out of bounds": (lambda t: [_write(t, "o.csv", _chinchilla_runs()), "--law", "chinchilla", "--fix", "alpha=9"],
                          "outside the law's bounds"),
    "column absent": (lambda t: [_write(t, "a.csv", _chinchilla_runs()), "--column", "tokens=D"], "has no column 'D'"),
    "not canonical": (lambda t: [_write(t, "n.csv", _chinchilla_runs()), "--column", "size=N"], "not a canonical column"),
    "no file": (lambda t: [t / "nope.csv"], "no such file"),
    "file type": (lambda t: [_write(t, "x.xlsx", _chinchilla_runs())], "unknown table type"),
    "sweep without runs": (lambda t: [t], "needs runs.parquet"),
    "huber delta": (lambda t: [_write(t, "h.csv", _chinchilla_runs()), "--law", "chinchilla", "--huber-delta", "0"],
                    "must be a positive number"),
    "fix on saved fit": (lambda t: [REPO / "fits" / "joint_moe_published.json", "--fix", "a=1"], "is a saved fit"),
    "predict lacks column": (lambda t: [REPO / "fits" / "joint_moe_published.json", "--predict",
                                        _write(t, "p.csv", pd.DataFrame({"params_active": [1e9]}))], "needs column"),
    "negative bootstrap": (lambda t: [_write(t, "b.csv", _chinchilla_runs()), "--bootstrap", "-1"], "must be >= 0"),
    # fitting flags with a saved fit are refused even at their default values (they were ignored)
    "seed on saved fit": (lambda t: [REPO / "fits" / "joint_moe_published.json", "--seed", "0"],
                          "--seed: INPUT"),
    "bootstrap on saved fit": (lambda t: [REPO / "fits" / "joint_moe_published.json", "--bootstrap", "500"],
                               "--bootstrap: INPUT"),
    "kfold on saved fit": (lambda t: [REPO / "fits" / "joint_moe_published.json", "--kfold", "0"],
                           "--kfold: INPUT"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(env, tmp_path, case):
    make, message = BAD[case]
    out = tmp_path / "out" / "fit.json"
    r = moe_fit(env, *make(tmp_path), "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-fit: error:") and message in lines[0], r.stderr
    assert r.stdout == "" and not out.exists() and "Traceback" not in r.stderr


def test_saved_fit_refusal_names_every_fitting_flag_given(env):
    r = moe_fit(env, REPO / "fits" / "joint_moe_published.json", "--bootstrap", 0, "--kfold", 3, "--seed", 1)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bootstrap, --kfold, --seed: INPUT" in lines[0] and "is a saved fit" in lines[0]


@pytest.mark.parametrize("law, target", [("chinchilla", "fit_law"), ("auto", "select_law")])
def test_fitting_without_the_flags_uses_the_defaults(monkeypatch, tmp_path, capsys, law, target):
    from moe_scaling.cli import fit as cli
    from moe_scaling.laws.published import published_fit

    seen = {}
    fake = published_fit("chinchilla", LAWS["chinchilla"].reference, "test")

    def record(*args, **kw):
        seen.update(kw)
        return (fake, []) if target == "select_law" else fake

    monkeypatch.setattr(cli, target, record)
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda path: None)
    assert cli.main([str(_write(tmp_path, "d.csv", _chinchilla_runs())), "--law", law, "--json"]) == 0
    assert (seen["bootstrap"], seen["kfold"], seen["seed"]) == (200, 5, 0)
    seen.clear()
    assert cli.main([str(tmp_path / "d.csv"), "--law", law, "--bootstrap", "7", "--kfold", "0",
                     "--seed", "3", "--json"]) == 0
    assert (seen["bootstrap"], seen["kfold"], seen["seed"]) == (7, 0, 3)
    capsys.readouterr()


def test_bootstrap_starts_must_be_positive_and_only_act_when_fitting(tmp_path):
    from moe_scaling.cli import fit as cli_fit
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli_fit.main([str(REPO / "fits" / "joint_moe_published.json"), "--bootstrap-starts", "64"]) == 2
    assert "--bootstrap-starts: INPUT" in err.getvalue() and err.getvalue().count("\n") == 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli_fit.main([str(REPO / "results" / "quickstart"), "--bootstrap-starts", "0"]) == 2
    assert "--bootstrap-starts 0: must be at least 1" in err.getvalue() and err.getvalue().count("\n") == 1
