"""Two local workers share one sweep through a real PostgreSQL server: every point runs once.

The server comes from `.ci/postgres.sh` (`eval "$(bash .ci/postgres.sh)"` exports
MOE_SCALING_TEST_POSTGRES_URL). In CI (CI=true) a missing server is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import uuid

import optuna
import pandas as pd
import pytest

from test_sweep import assert_exactly_once, claim_race, run_cli, write_grid

URL = os.environ.get("MOE_SCALING_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url() -> str:
    if not URL:
        message = ("MOE_SCALING_TEST_POSTGRES_URL is not set; start a server with "
                   "eval \"$(bash .ci/postgres.sh)\"")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return URL


def test_two_workers_on_postgres_run_every_point_exactly_once(tmp_path, postgres_url):
    name = f"pg-{uuid.uuid4().hex[:8]}"            # a fresh study on a possibly shared server
    grid = write_grid(tmp_path, name, grid={"n_experts": [2, 4], "top_k": [1, 2]})
    out = tmp_path / "out"
    try:
        proc = run_cli("run", grid, "--out", out, "--workers", 2, "--storage", postgres_url, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["done"] == 4
        assert not (out / "sweep.db").exists()               # the queue lives in PostgreSQL
        ids = json.loads((out / "sweep.json").read_text())["runs"]
        runs = assert_exactly_once(out, postgres_url, name, {rid: "completed" for rid in ids})
        assert runs["worker"].nunique() == 2 and set(runs["attempts"]) == {1}
        manifest = json.loads((out / "sweep.json").read_text())
        assert manifest["storage"].startswith("postgresql://")
        # the same command again (e.g. from a second machine) finds nothing left to do
        again = run_cli("run", grid, "--out", out, "--storage", postgres_url, "--quiet")
        assert again.returncode == 0, again.stderr
        assert pd.read_parquet(out / "runs.parquet")["attempts"].tolist() == [1, 1, 1, 1]
    finally:
        try:
            optuna.delete_study(study_name=name, storage=postgres_url)
        except KeyError:
            pass


def test_concurrent_claims_on_postgres_hand_out_each_trial_once(postgres_url):
    name = f"race-{uuid.uuid4().hex[:8]}"
    try:
        assert sorted(claim_race(postgres_url, name)) == list(range(150))
    finally:
        optuna.delete_study(study_name=name, storage=postgres_url)


OPENER = """
import sys, time
from moe_scaling.sweep.queue import open_study
time.sleep(max(float(sys.argv[2]) - time.time(), 0))      # all at once
open_study(sys.argv[1], "first", create=True)
"""


def test_processes_that_open_an_empty_database_at_once_all_get_the_queue(postgres_url):
    """Workers of several machines starting together on a new database all create optuna's tables
    at once; PostgreSQL refuses all but one (before: 6 of 8 such processes died with an
    IntegrityError or ProgrammingError, as a CI run of this suite once did)."""
    import subprocess
    import sys
    import time

    import psycopg

    server, db = postgres_url.rsplit("/", 1)[0], f"empty_{uuid.uuid4().hex[:8]}"
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    try:
        start = time.time() + 8                              # after every interpreter has imported
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, f"{server}/{db}", str(start)],
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        last = [next((line for line in e.splitlines()[::-1] if "Error" in line), e[-200:]) for e in errors]
        assert [p.returncode for p in procs] == [0] * 8, last
        assert optuna.load_study(study_name="first", storage=f"{server}/{db}").trials == []
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
