"""`moe-sweep dashboard`: optuna-dashboard on a sweep's PostgreSQL storage, while the sweep runs and
after it finished, checked through the dashboard's HTTP API and in headless Chromium.

Needs the `dashboard` extra, the CI's throwaway PostgreSQL (`eval "$(bash .ci/postgres.sh)"`) and
Debian's chromium (`eval "$(bash .ci/chromium.sh)"`, exports MOE_SCALING_TEST_CHROMIUM). In CI
(CI=true) a missing server or browser is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from test_sweep import REPO, STEPS, sweep_cmd, write_grid
from test_sweep_postgres import postgres_url  # noqa: F401 - the fixture

CHROMIUM = os.environ.get("MOE_SCALING_TEST_CHROMIUM")
EVAL_STEPS = list(range(0, STEPS + 1, 100))          # TINY evaluates every 100 steps, and at step 0


@pytest.fixture
def chromium() -> str:
    if not CHROMIUM:
        message = "MOE_SCALING_TEST_CHROMIUM is not set; install it with eval \"$(bash .ci/chromium.sh)\""
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def server_log(tmp_path):
    """A file for the dashboard's output (a line per request; the child keeps its own handle):
    a pipe nobody reads stops the server once it holds 64 KiB."""
    return open(tmp_path / "dashboard.log", "a")


def wait_for(what: str, check, logs=(), timeout: float = 180.0, every: float = 0.5):
    """Poll ``check()`` until it returns something truthy (its value), or fail saying ``what`` and
    showing the end of each file in ``logs`` (the children's output: why the server never answered)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
        except OSError:          # the server is not listening yet
            value = None
        if value:
            return value
        time.sleep(every)
    tails = "".join(f"\n--- {p.name} (end) ---\n{p.read_text(errors='replace')[-3000:]}" for p in map(Path, logs)
                    if p.is_file())
    pytest.fail(f"timed out waiting for {what}{tails}")


def attrs(trial: dict) -> dict:
    """A trial's user attributes as the API gives them (numbers as text) read back to values."""
    def value(text: str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return {a["key"]: value(a["value"]) for a in trial["user_attrs"]}


def chromium_run(binary: str, profile, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args],
                          capture_output=True, text=True, timeout=120)


def test_dashboard_serves_a_running_then_finished_sweep_on_postgres(tmp_path, postgres_url, chromium):  # noqa: F811
    name = f"dash-{uuid.uuid4().hex[:8]}"
    grid = write_grid(tmp_path, name, grid={"n_experts": [2, 4]})
    out, port = tmp_path / "out", free_port()
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    with open(tmp_path / "sweep.log", "w") as log:      # a file, not a pipe (server_log says why)
        sweep = subprocess.Popen(sweep_cmd("run", grid, "--out", out, "--storage", postgres_url, "--quiet"),
                                 cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    dash = None
    try:
        logs = (tmp_path / "sweep.log", tmp_path / "dashboard.log")
        wait_for("the sweep's manifest", lambda: (out / "sweep.json").is_file(), logs)
        with server_log(tmp_path) as log:
            dash = subprocess.Popen(sweep_cmd("dashboard", out, "--storage", postgres_url, "--port", port),
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        study_id = wait_for("the study in /api/studies", lambda: next(
            (s["study_id"] for s in get(f"{base}/api/studies")["study_summaries"] if s["study_name"] == name), None), logs)

        # while the sweep runs: a RUNNING trial already shows its learning curve so far
        def running_with_curve():
            trials = get(f"{base}/api/studies/{study_id}")["trials"]
            live = [t for t in trials if t["state"] == "Running" and len(t["intermediate_values"]) >= 2]
            return live[0] if live else None
        live = wait_for("a running trial with two eval points", running_with_curve, logs)
        assert [v["step"] for v in live["intermediate_values"]][:2] == EVAL_STEPS[:2]
        assert sweep.poll() is None                                     # the sweep was still running

        assert sweep.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]

        # optuna-dashboard serves its trial list from a cache refreshed every 2-10 s (by study size):
        # the sweep's end shows within that
        def all_finished():
            trials = get(f"{base}/api/studies/{study_id}")["trials"]
            return trials if all(t["state"] in ("Complete", "Pruned", "Fail") for t in trials) else None
        trials = wait_for("every trial finished in /api/studies", all_finished, logs, timeout=60)
    finally:
        for proc in (dash, sweep):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    runs = pd.read_parquet(out / "runs.parquet").set_index("run_id")
    curves = pd.read_parquet(out / "curves.parquet")
    assert sorted(attrs(t)["run_id"] for t in trials) == sorted(runs.index)   # every run, once
    for t in trials:
        a = attrs(t)
        rid = a["run_id"]
        assert t["state"] == "Complete" and a["status"] == "completed"
        assert t["values"] == [pytest.approx(runs.loc[rid, "eval_loss"], abs=0)]
        want = curves[(curves["run_id"] == rid) & curves["eval_loss"].notna()]
        assert [v["step"] for v in t["intermediate_values"]] == want["step"].tolist() == EVAL_STEPS
        assert [v["value"] for v in t["intermediate_values"]] == want["eval_loss"].tolist()
        assert a["n_experts"] == runs.loc[rid, "n_experts"] and a["top_k"] == runs.loc[rid, "top_k"]
        assert a["sparsity"] == pytest.approx(runs.loc[rid, "sparsity"], abs=1e-12)
        assert {"granularity", "expansion", "activation_ratio", "params_active", "params_total"} <= set(a)
    assert live["number"] in [t["number"] for t in trials]

    # the page in a real browser: the study and a learning curve are on it; a screenshot for people
    with server_log(tmp_path) as log:
        dash = subprocess.Popen(sweep_cmd("dashboard", out, "--storage", postgres_url, "--port", port),
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("the dashboard after the sweep", lambda: get(f"http://127.0.0.1:{port}/api/meta"),
                 [tmp_path / "dashboard.log"])
        page = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        dom = chromium_run(chromium, tmp_path / "profile-dom", "--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert name in dom.stdout                                    # the study's name is rendered
        assert "Intermediate" in dom.stdout or "intermediate" in dom.stdout, dom.stdout[-3000:]
        assert "<svg" in dom.stdout                                  # plotly drew the curves
        shot = tmp_path / "dashboard.png"
        r = chromium_run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,1000",
                         page)
        assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    finally:
        dash.terminate()
        dash.wait(timeout=30)
        try:
            optuna.delete_study(study_name=name, storage=postgres_url)
        except KeyError:
            pass


def test_a_sweep_folder_without_its_storage_is_served_from_its_tables(tmp_path):
    """The committed results/quickstart has no sweep.db: its trials come from runs.parquet and
    curves.parquet, in the states, values and curves the live queue would give them."""
    from moe_scaling.sweep.dashboard import study_from_tables

    study = study_from_tables(REPO / "results" / "quickstart", "quickstart")
    runs = pd.read_parquet(REPO / "results" / "quickstart" / "runs.parquet").set_index("run_id")
    assert len(study.trials) == len(runs) == 9
    for t in study.trials:
        rid = t.user_attrs["run_id"]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == runs.loc[rid, "eval_loss"]
        assert max(t.intermediate_values) == runs.loc[rid, "steps"]
        assert t.user_attrs["n_experts"] == runs.loc[rid, "n_experts"]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(sweep_cmd("dashboard", tmp_path / "nope"), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no sweep.json" in r.stderr, r.stderr
