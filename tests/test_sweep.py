"""moe-sweep end to end: real subprocesses, real (tiny) training runs, a real SQLite queue.

What is shown: two local workers run every point exactly once; kill -9 of every process mid-sweep
and the same command again finishes the sweep (completed runs untouched, the interrupted run
resumes from its checkpoint bit-exactly, curves without gaps or duplicates); a diverged run and a
failing run are recorded and the sweep goes on; bad grids exit 2 with one line and write nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from conftest import damage_checkpoint
from moe_scaling.errors import InputError
from moe_scaling.sweep.liveness import record_worker_gone

REPO = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 300, 10

TINY = {
    "data": {"corpus": "stdlib", "seq_len": 32, "max_tokens": 200_000},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
    "train": {"tokens": STEPS * 8 * 32, "batch_size": 8, "lr": 0.003, "eval_every": 100,
              "eval_batches": 2, "log_every": LOG_EVERY, "ckpt_every": 20},
}


def write_grid(folder: Path, name: str, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, **{k: dict(v) for k, v in TINY.items()}}
    for key, value in extra.items():
        if isinstance(value, dict) and key in TINY:
            doc[key] = doc[key] | value
        else:
            doc[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moe_scaling.cli.sweep", *map(str, args)]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    return subprocess.run(sweep_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def seed_cache(src: Path, out: Path) -> None:
    """Start a sweep folder with another sweep's compilation cache (same shapes compile once)."""
    if (src / "jax_cache").is_dir():
        shutil.copytree(src / "jax_cache", out / "jax_cache")


def trials_by_run(storage: str, name: str) -> dict[str, list]:
    study = optuna.load_study(study_name=name, storage=storage)
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.user_attrs["run_id"], []).append(t)
    return out


def assert_exactly_once(out: Path, storage: str, name: str, statuses: dict[str, str]) -> pd.DataFrame:
    """Every run has one finished trial (plus, at most, FAIL trials of interrupted attempts), one
    row in runs.parquet with the expected status, and a gap-free, duplicate-free curve."""
    trials = trials_by_run(storage, name)
    assert set(trials) == set(statuses)
    for rid, ts in trials.items():
        finished = [t for t in ts if t.state == TrialState.COMPLETE
                    or (t.state == TrialState.FAIL and t.user_attrs.get("status") == "failed")]
        assert len(finished) == 1, (rid, [(t.number, t.state) for t in ts])
        others = [t for t in ts if t not in finished]
        assert all(t.state == TrialState.FAIL and "status" not in t.user_attrs for t in others)
    runs = pd.read_parquet(out / "runs.parquet")
    assert sorted(runs["run_id"]) == sorted(statuses)
    assert dict(zip(runs["run_id"], runs["status"])) == statuses
    curves = pd.read_parquet(out / "curves.parquet")
    for rid, status in statuses.items():
        steps = curves.loc[curves["run_id"] == rid, "step"].tolist()
        if status == "completed":
            assert steps == list(range(0, STEPS + 1, LOG_EVERY)), (rid, steps)
    return runs


CLAIMER = """
import json, sys
from moe_scaling.sweep.queue import claim_next, open_study
study = open_study(sys.argv[1], sys.argv[2])
claimed = []
while (trial := claim_next(study)) is not None:
    claimed.append(trial.number)
print(json.dumps(claimed))
"""


def claim_race(storage: str, name: str, trials: int = 150, processes: int = 3) -> list[int]:
    """Enqueue ``trials`` runs, let ``processes`` processes claim them as fast as they can and
    return every trial number claimed (by anyone)."""
    from moe_scaling.sweep.queue import open_study

    study = open_study(storage, name, create=True)
    for i in range(trials):
        study.enqueue_trial(params={}, user_attrs={"run_id": f"r{i}"})
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, storage, name], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(processes)]
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed += json.loads(out)
    return claimed


def test_cpu_share_slices_the_cores_without_overlap():
    from moe_scaling.sweep.devices import cpu_share

    assert [cpu_share(i, 2, [0, 1]) for i in range(2)] == [{0}, {1}]
    assert [cpu_share(i, 3, list(range(16))) for i in range(3)] == [set(range(0, 5)), set(range(5, 10)),
                                                                     set(range(10, 16))]
    assert [cpu_share(i, 3, [4, 6]) for i in range(3)] == [{4}, {6}, {4}]    # more workers than cores
    with pytest.raises(InputError, match="need 0 <= worker < workers"):
        cpu_share(2, 2, [0, 1])


def test_eta_weighs_the_steps_left():
    """The progress line's ETA: steps left (the runs not done, less the in-flight steps) times the
    finished runs' wall time per step, over the workers; a run outside ``run_ids`` is not counted."""
    from moe_scaling.sweep.progress import snapshot
    from moe_scaling.sweep.queue import WorkerContext

    steps = {"a": 500, "b": 50_000, "c": 500, "d": 2_000}
    ctx = WorkerContext(out="x", storage_url="sqlite://", study_name="s", grid_dir=".", total=4, n_workers=2,
                        run_ids=frozenset(steps), run_steps=steps)
    counts = {"done": 1, "done_ids": {"a"}, "walls": {"a": 10.0}, "failed": [], "running": {}}
    live = [{"run_id": "d", "step": 1_000, "steps": 2_000, "started": time.time()}]
    snap = snapshot(ctx, counts, live)
    assert snap["eta_s"] == pytest.approx((50_000 + 500 + 2_000 - 1_000) * (10.0 / 500) / 2)
    # without step counts: the mean wall per finished run times the runs left
    plain = snapshot(dataclasses.replace(ctx, run_steps=None), counts, live)
    assert plain["eta_s"] == pytest.approx((4 - 1 - 0.5) * 10.0 / 2)


def test_concurrent_claims_hand_out_each_trial_once(tmp_path):
    claimed = claim_race(f"sqlite:///{tmp_path / 'queue.db'}", "race")
    assert sorted(claimed) == list(range(150))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 4-run tiny grid swept by two local workers on SQLite, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    grid = write_grid(root, "tiny", grid={"n_experts": [2, 4], "top_k": [1, 2]})
    out = root / "out"
    proc = run_cli("run", grid, "--out", out, "--workers", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["done"] == summary["total"] == 4 and summary["status"]["counts"]["completed"] == 4
    return grid, out


def test_two_local_workers_run_every_point_exactly_once(reference):
    grid, out = reference
    records = [json.loads(p.read_text()) for p in out.glob("runs/*/record.json")]
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        # each worker pinned itself to its own half of the cores (sweep/devices.py, cpu_share)
        shares = {r["worker"]: frozenset(r["cpus"]) for r in records}
        assert len(shares) == 2 and not frozenset.intersection(*shares.values())
    storage = f"sqlite:///{out / 'sweep.db'}"
    manifest = json.loads((out / "sweep.json").read_text())
    ids = manifest["runs"]
    # no absolute paths: the grid relative to the folder, the default queue (DIR/sweep.db) as null,
    # so a folder committed or moved names its own files wherever it lands
    assert (out / manifest["grid"]).resolve() == grid.resolve() and manifest["storage"] is None
    from moe_scaling.sweep.dashboard import sweep_storage
    assert sweep_storage(out) == (storage, "tiny")
    runs = assert_exactly_once(out, storage, "tiny", {rid: "completed" for rid in ids})
    assert set(runs["attempts"]) == {1}
    assert runs["worker"].nunique() == 2                       # both workers took runs
    for col in ("params_total", "params_active", "params_embedding", "flops_per_token_forward",
                "granularity", "expansion", "d_expert", "corpus_hash", "package_version", "tokens_per_s"):
        assert runs[col].notna().all(), col
    assert (runs["tokens"] == STEPS * 8 * 32).all()
    sparse = runs["top_k"] < runs["n_experts"]
    assert (runs["params_active"][sparse] < runs["params_total"][sparse]).all()
    # every run's TensorBoard scalars, in its run folder (tensorboard --logdir OUT lists them all)
    from conftest import assert_run_scalars, tensorboard_scalars
    for rid in ids:
        s = assert_run_scalars(out / "runs" / rid, steps=STEPS, moe_layers=1, log_every=LOG_EVERY)
        curve = json.loads((out / "runs" / rid / "curve.json").read_text())
        evals = [(r["step"], r["eval_loss"]) for r in curve if r["eval_loss"] is not None and r["eval_loss"] == r["eval_loss"]]
        assert [st for st, _ in s["eval/loss"]] == [st for st, _ in evals]
        # event values are float32 (TensorBoard's simple_value): equal to the curve within its rounding
        assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(s["eval/loss"], evals))
        assert s["train/lr"][-1][1] < s["train/lr"][0][1]            # the cosine schedule decays
    assert len(tensorboard_scalars(out)) == 0                         # one folder per run, none at the top
    # the persistent compilation cache holds the train steps
    assert any(p.name.startswith("jit__train_step") for p in (out / "jax_cache").iterdir())
    # a second `run` of a finished sweep trains nothing and changes nothing
    before = (out / "runs.parquet").read_bytes()
    records = {p: p.read_text() for p in (out / "runs").glob("*/record.json")}
    proc = run_cli("run", grid, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert {p: p.read_text() for p in records} == records
    assert pd.read_parquet(out / "runs.parquet").equals(pd.read_parquet(io.BytesIO(before)))


def kill_midway(grid: Path, out: Path, workers: int, after_completed: int = 1) -> str:
    """Start `moe-sweep run`, wait until ``after_completed`` runs are completed and another run has
    written a checkpoint, then kill -9 the whole process group. Returns the interrupted run id."""
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    log = out.with_name(out.name + ".log")          # a file: a pipe read only at the end blocks the child at 64 KiB
    with open(log, "w") as err:
        proc = subprocess.Popen(sweep_cmd("run", grid, "--out", out, "--workers", workers, "--quiet"),
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    interrupted = None
    deadline = time.time() + 180
    while interrupted is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/record.json")
                   if p.stat().st_size]
        done = [r for r in records if r["status"] == "completed"]
        for r in records:
            ckpt = out / "runs" / r["run_id"] / "ckpt"
            if len(done) >= after_completed and r["status"] == "running" and ckpt.is_dir() and any(
                    c.name.isdigit() for c in ckpt.iterdir()):
                interrupted = r["run_id"]
    assert interrupted is not None, "the sweep ended before a run was mid-way; lengthen the runs: " + log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)                  # the parent and every worker
    proc.wait()
    return interrupted


def copy_reference(reference, tmp_path: Path) -> tuple[Path, Path]:
    ref_grid, ref_out = reference
    grid = tmp_path / ref_grid.name
    grid.write_text(ref_grid.read_text())
    out = tmp_path / "out"
    out.mkdir()
    seed_cache(ref_out, out)
    return grid, out


def test_kill_every_worker_then_rerun_finishes_exactly_once(reference, tmp_path):
    grid, out = copy_reference(reference, tmp_path)
    ref_out = reference[1]
    interrupted = kill_midway(grid, out, workers=2)
    finished_before = {r["run_id"]: r for r in map(json.loads, (p.read_text() for p in (
        out / "runs").glob("*/record.json"))) if r["status"] == "completed"}
    # every worker is dead: status counts their runs as interrupted, though their records say running
    status = run_cli("status", out, "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["counts"]
    assert counts["running"] == 0 and counts["interrupted"] >= 1
    assert counts["completed"] == len(finished_before)

    rerun = run_cli("run", grid, "--out", out, "--workers", 2, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    storage = f"sqlite:///{out / 'sweep.db'}"
    ids = json.loads((out / "sweep.json").read_text())["runs"]
    runs = assert_exactly_once(out, storage, "tiny", {rid: "completed" for rid in ids})
    runs = runs.set_index("run_id")
    for rid, before in finished_before.items():               # completed runs were not re-run
        assert runs.loc[rid, "attempts"] == 1 and runs.loc[rid, "finished_at"] == before["finished_at"]
    assert runs.loc[interrupted, "attempts"] == 2
    trials = trials_by_run(storage, "tiny")[interrupted]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    # the resumed trial carries the whole learning curve (the dashboard's intermediate values)
    curve = pd.read_parquet(out / "curves.parquet").query("run_id == @interrupted").dropna(subset=["eval_loss"])
    assert trials[1].intermediate_values == dict(zip(curve["step"], curve["eval_loss"]))
    assert sorted(trials[1].intermediate_values) == list(range(0, STEPS + 1, 100))
    # the second attempt resumed from the checkpoint: it trained fewer tokens than the budget
    row = runs.loc[interrupted]
    assert row["tokens_per_s"] * row["step_time_s"] < 0.97 * row["tokens"]   # >= 1 checkpoint (20 of 300 steps) skipped
    # and bit-exactly: every run ends with the loss of the uninterrupted reference sweep
    ref = pd.read_parquet(ref_out / "runs.parquet").set_index("run_id")
    assert runs["eval_loss"].to_dict() == ref.loc[runs.index, "eval_loss"].to_dict()


def test_a_folder_without_its_records_keeps_its_tables_and_trains_only_what_they_lack(reference, tmp_path):
    """A sweep folder committed to git holds its tables, manifest and grid copy, not its run records,
    checkpoints or queue. Run again there (a fresh clone: one run never finished, so it is missing
    from the tables), `status` counts the finished runs from the tables, and the sweep restores
    their records from the tables, trains only the missing run, and the tables keep every row and
    curve as they were. (Before: the first table
    rebuild, from records alone, replaced the committed tables by the one new run, and every
    finished run was queued to train again.)"""
    grid, out = copy_reference(reference, tmp_path)
    ref_out = reference[1]
    ref_runs = pd.read_parquet(ref_out / "runs.parquet")
    ref_curves = pd.read_parquet(ref_out / "curves.parquet")
    lost = ref_runs["run_id"].iloc[-1]
    ref_runs.iloc[:-1].to_parquet(out / "runs.parquet", index=False)
    ref_curves[ref_curves["run_id"] != lost].to_parquet(out / "curves.parquet", index=False)
    shutil.copy(ref_out / "sweep.json", out / "sweep.json")
    shutil.copy(ref_out / "grid.yaml", out / "grid.yaml")
    status = run_cli("status", out, "--json")                 # reads the tables, writes nothing
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {"completed": 3, "diverged": 0, "failed": 0, "running": 0,
                                                   "interrupted": 0, "pending": 1}
    assert not (out / "runs").exists()

    proc = run_cli("run", grid, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "restored 3 run record(s) from" in proc.stderr
    runs = pd.read_parquet(out / "runs.parquet").set_index("run_id").sort_index()
    ref = ref_runs.set_index("run_id").sort_index()
    kept = ref.drop(index=lost)
    pd.testing.assert_frame_equal(runs.loc[kept.index, ref.columns], kept)      # every committed row as it was
    assert runs.loc[lost, "attempts"] == 1 and runs.loc[lost, "eval_loss"] == ref.loc[lost, "eval_loss"]
    curves = pd.read_parquet(out / "curves.parquet").sort_values(["run_id", "step"], ignore_index=True)
    pd.testing.assert_frame_equal(curves, ref_curves.sort_values(["run_id", "step"], ignore_index=True))
    assert [r.name for r in (out / "runs").iterdir() if (r / "ckpt").is_dir()] == [lost]   # one run trained
    # each restored run's trial is COMPLETE with the run's eval curve (the dashboard's)
    for rid, (trial,) in trials_by_run(f"sqlite:///{out / 'sweep.db'}", "tiny").items():
        assert trial.state == TrialState.COMPLETE and trial.value == ref.loc[rid, "eval_loss"]
        evals = curves[(curves["run_id"] == rid) & curves["eval_loss"].notna()]
        assert trial.intermediate_values == dict(zip(evals["step"], evals["eval_loss"]))


def test_a_new_queue_counts_the_runs_its_records_finished_as_done_before_any_worker_starts(reference, tmp_path):
    """A queue filled in a folder whose runs already ended (a lost sweep.db, or records restored
    from the tables) closes their trials when it is filled: the progress line counted them as
    waiting, "runs 47/216 done" with 142 finished, its ETA counting their steps, until a worker
    happened to claim each one."""
    from moe_scaling.sweep.queue import sweep_counts
    from moe_scaling.sweep.runner import plan_sweep, prepare

    grid, out = copy_reference(reference, tmp_path)
    ref_out = reference[1]
    ref = pd.read_parquet(ref_out / "runs.parquet").set_index("run_id")
    for rdir in (ref_out / "runs").iterdir():                   # records and curves, no queue
        (out / "runs" / rdir.name).mkdir(parents=True)
        for name in ("record.json", "curve.json"):
            shutil.copy(rdir / name, out / "runs" / rdir.name / name)
    study, _ = prepare(plan_sweep(grid), out)
    counts = sweep_counts(study)
    assert counts["done"] == 4 and counts["done_ids"] == set(ref.index) and not counts["running"]
    curves = pd.read_parquet(ref_out / "curves.parquet")
    for rid, (trial,) in trials_by_run(f"sqlite:///{out / 'sweep.db'}", "tiny").items():
        assert trial.state == TrialState.COMPLETE and trial.value == ref.loc[rid, "eval_loss"]
        evals = curves[(curves["run_id"] == rid) & curves["eval_loss"].notna()]
        assert trial.intermediate_values == dict(zip(evals["step"], evals["eval_loss"]))
    # a second trial of a finished run (two sweeps filling one queue at once) closes as a duplicate
    from moe_scaling.sweep.queue import enqueue_run
    from moe_scaling.sweep.runner import close_finished
    rid = ref.index[0]
    enqueue_run(study, {"run_id": rid, "config": {}, "sweep": "tiny"})
    assert close_finished(study, out, {rid}) == 1
    ends = sorted((t.state, t.user_attrs["status"]) for t in trials_by_run(f"sqlite:///{out / 'sweep.db'}", "tiny")[rid])
    assert ends == [(TrialState.COMPLETE, "completed"), (TrialState.PRUNED, "duplicate")]
    proc = run_cli("run", grid, "--out", out, "--json")          # nothing left to train
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == 4 and not any((out / "runs").glob("*/ckpt"))


def test_a_runs_row_gives_back_its_record(reference):
    """record_from_row inverts run_row (runs_table) on every row of a real sweep's runs.parquet (the row it gives
    is the row it came from): with the run's config from the grid its config is the record's own; from
    the row's columns alone it holds what a metric of the same name wrote there (the resolved
    dispatch "capacity" over the configured "auto"), and the row still comes back the same."""
    from moe_scaling.sweep.results import record_from_row, runs_table

    out = reference[1]
    table = pd.read_parquet(out / "runs.parquet")
    for row in table.to_dict("records"):                       # numpy scalars and NaN, as a restore reads them
        record = json.loads((out / "runs" / row["run_id"] / "record.json").read_text())
        assert record["config"]["train"]["dispatch"] == "auto" and row["dispatch"] == "capacity"
        for config in (record["config"], None):
            back = record_from_row(row, config)
            again = runs_table([back]).astype(table.dtypes.to_dict())
            pd.testing.assert_frame_equal(again, pd.DataFrame([row]).astype(table.dtypes.to_dict()))
            assert {k: back[k] for k in ("status", "steps", "tokens", "attempts")} == {
                k: record[k] for k in ("status", "steps", "tokens", "attempts")}
        assert record_from_row(row, record["config"])["config"] == record["config"]
        assert record_from_row(row)["config"]["train"]["dispatch"] == "capacity"


def test_divergence_and_errors_are_recorded_and_the_sweep_goes_on(tmp_path, reference):
    (tmp_path / "bad.jsonl").write_text("this line is not JSON\n")
    grid = write_grid(tmp_path, "faults", train={"tokens": 40 * 8 * 32},
                      grid={"corpus": ["bad.jsonl", "stdlib"], "lr": [1.0e6, 0.003]},
                      exclude=["corpus != 'stdlib' and lr > 1"])
    out = tmp_path / "out"
    out.mkdir()
    seed_cache(reference[1], out)
    proc = run_cli("run", grid, "--out", out)
    assert proc.returncode == 1, proc.stderr                   # a failed run fails the sweep command
    assert "runs 1/3 done" in proc.stderr and "runs 2/3 done" in proc.stderr   # the progress line
    assert proc.stderr.strip().splitlines()[-1].startswith("moe-sweep: 1 run(s) failed (")
    runs = pd.read_parquet(out / "runs.parquet").set_index(["corpus", "lr"])
    assert len(runs) == 3
    failed, diverged, ok = runs.loc[("bad.jsonl", 0.003)], runs.loc[("stdlib", 1.0e6)], runs.loc[("stdlib", 0.003)]
    assert failed["status"] == "failed" and "bad.jsonl:1 is not a JSON object" in failed["error"]
    assert (tmp_path / "out" / "runs" / failed["run_id"] / "error.txt").is_file()
    assert diverged["status"] == "diverged" and 1 <= diverged["diverged_step"] <= 40
    # the trials tell the three ends apart (optuna-dashboard shows the states): PRUNED = diverged
    states = {rid: [(t.state, t.user_attrs.get("status")) for t in ts]
              for rid, ts in trials_by_run(f"sqlite:///{out / 'sweep.db'}", "faults").items()}
    assert states[diverged["run_id"]] == [(TrialState.PRUNED, "diverged")]
    assert states[failed["run_id"]] == [(TrialState.FAIL, "failed")]
    assert states[ok["run_id"]] == [(TrialState.COMPLETE, "completed")]
    assert ok["status"] == "completed" and ok["eval_loss"] < 5.0

    status = run_cli("status", out, "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["counts"]
    assert counts == {"completed": 1, "diverged": 1, "failed": 1, "running": 0, "interrupted": 0, "pending": 0}
    text = run_cli("status", out)
    assert "1 completed, 1 diverged, 1 failed" in text.stdout and "ConfigError: data.corpus" in text.stdout

    # the tables alone (a clone): every run that ended gets its record back, the failed one too, so
    # that (as here) it trains again only with --retry-failed
    from moe_scaling.sweep.results import restore_records
    clone = tmp_path / "clone"
    clone.mkdir()
    seed_cache(reference[1], clone)
    for name in ("runs.parquet", "curves.parquet"):
        shutil.copy(out / name, clone / name)
    assert sorted(restore_records(clone)) == sorted(runs["run_id"])
    back = json.loads((clone / "runs" / diverged["run_id"] / "record.json").read_text())
    assert back["status"] == "diverged" and back["diverged_step"] == diverged["diverged_step"]
    back = json.loads((clone / "runs" / failed["run_id"] / "record.json").read_text())
    assert back["status"] == "failed" and back["error"] == failed["error"]
    assert back["restored_from"] == "runs.parquet"
    assert restore_records(clone) == []                        # once
    cloned = run_cli("run", grid, "--out", clone, "--quiet")  # a fresh queue: nothing trains
    assert cloned.returncode == 1 and f"1 run(s) failed ({failed['run_id']})" in cloned.stderr
    assert not any((clone / "runs").glob("*/ckpt"))
    pd.testing.assert_frame_equal(pd.read_parquet(clone / "runs.parquet").set_index("run_id").sort_index(),
                                  pd.read_parquet(out / "runs.parquet").set_index("run_id").sort_index(),
                                  check_like=True)
    # a --retry-failed interrupted after filling the queue (no worker yet) still retries on a plain
    # rerun; its restored record has no checkpoint to resume, so a changed corpus does not stop it
    from moe_scaling.sweep.runner import plan_sweep, prepare
    original = (tmp_path / "bad.jsonl").read_text()
    (tmp_path / "bad.jsonl").write_text("still not JSON\n")
    prepare(plan_sweep(grid), clone, retry_failed=True)
    (tmp_path / "bad.jsonl").write_text(original)
    retried = run_cli("run", grid, "--out", clone, "--quiet")
    assert retried.returncode == 1, retried.stderr
    again_clone = pd.read_parquet(clone / "runs.parquet").set_index("run_id")
    assert again_clone.loc[failed["run_id"], "attempts"] == 2 and again_clone.loc[ok["run_id"], "attempts"] == 1

    # a rerun leaves the failed run alone; --retry-failed runs it once more
    again = run_cli("run", grid, "--out", out, "--quiet")
    assert again.returncode == 1, again.stderr                 # still failed
    assert again.stderr.strip() == (f"moe-sweep: 1 run(s) failed ({failed['run_id']}); `moe-sweep status {out}` "
                                    "shows why; fix the cause and rerun with --retry-failed")
    assert pd.read_parquet(out / "runs.parquet").set_index("run_id").loc[failed["run_id"], "attempts"] == 1
    retry = run_cli("run", grid, "--out", out, "--quiet", "--retry-failed")
    assert retry.returncode == 1, retry.stderr
    after = pd.read_parquet(out / "runs.parquet").set_index("run_id")
    assert after.loc[failed["run_id"], "attempts"] == 2 and after.loc[failed["run_id"], "status"] == "failed"
    assert after.loc[ok["run_id"], "attempts"] == 1


def test_a_damaged_newest_checkpoint_costs_one_interval(tmp_path):
    """A run stopped at step 25 (checkpoints 20 and 25), a file of checkpoint 25 deleted, then
    `moe-sweep run`: the run resumes from step 20, completes with the loss of an uninterrupted run,
    and the sweep exits 0."""
    from moe_scaling.sweep.grid import resolve_corpus
    from moe_scaling.sweep.runner import plan_sweep
    from moe_scaling.train.loop import train

    grid = write_grid(tmp_path, "damaged", train={"tokens": 30 * 8 * 32, "ckpt_every": 10})
    (run,) = plan_sweep(grid).runs
    data = dataclasses.replace(run.data, corpus=resolve_corpus(run.data.corpus, tmp_path))
    straight = train(run.model, run.train, data, progress=False)
    ckpt = tmp_path / "out" / "runs" / run.run_id / "ckpt"
    assert train(run.model, run.train, data, ckpt_dir=ckpt, progress=False, stop_at_step=25).status == "stopped"
    damage_checkpoint(ckpt / "25", "delete")
    proc = run_cli("run", grid, "--out", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "does not restore" in line]
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint step 25 in {ckpt} does not restore"), proc.stderr
    record = json.loads((ckpt.parent / "record.json").read_text())
    assert record["status"] == "completed" and record["attempts"] == 1
    assert record["eval_loss"] == straight.final_eval_loss                 # bit-identical, same machine
    assert record["tokens_per_s"] * record["step_time_s"] == pytest.approx(10 * 8 * 32)   # steps 21-30
    assert (ckpt / "damaged" / "25").is_dir()


def test_only_trains_a_subset_first_and_the_whole_grid_then_trains_the_rest(tmp_path):
    """`run --only EXPR` trains the runs for which EXPR holds and nothing else; the same command
    without it then trains only the others (the subset is complete, not trained again)."""
    grid = write_grid(tmp_path, "ordered", train={"tokens": 30 * 8 * 32}, grid={"n_experts": [2, 4]})
    out = tmp_path / "out"
    first = run_cli("run", grid, "--out", out, "--only", "n_experts == 4", "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["done"], summary["total"], summary["status"]["counts"]["completed"]) == (1, 1, 1)
    (done,) = [json.loads(p.read_text()) for p in out.glob("runs/*/record.json")]
    assert done["config"]["model"]["n_experts"] == 4
    # the manifest lists the whole grid in grid order, whichever subset a command trains
    from moe_scaling.sweep.runner import plan_sweep
    order = [r.run_id for r in plan_sweep(grid).runs]
    assert json.loads((out / "sweep.json").read_text())["runs"] == order and order[1] == done["run_id"]
    assert summary["status"]["counts"]["pending"] == 1
    rest = run_cli("run", grid, "--out", out, "--json")
    assert rest.returncode == 0, rest.stderr
    summary = json.loads(rest.stdout)
    assert (summary["done"], summary["total"], summary["status"]["counts"]["completed"]) == (2, 2, 2)
    again = json.loads((out / "runs" / done["run_id"] / "record.json").read_text())
    assert again == done                                            # untouched by the second command
    assert json.loads((out / "sweep.json").read_text())["runs"] == order


def test_only_leaves_the_queues_other_waiting_runs_alone(tmp_path):
    """A queue that already holds the whole grid (an earlier command without --only was stopped
    before it trained anything): `run --only EXPR` trains the subset and claims no other run."""
    from moe_scaling.sweep.runner import plan_sweep, prepare

    grid = write_grid(tmp_path, "queued", train={"tokens": 30 * 8 * 32}, grid={"n_experts": [2, 4]})
    out = tmp_path / "out"
    study, _ = prepare(plan_sweep(grid), out)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    proc = run_cli("run", grid, "--out", out, "--only", "n_experts == 4", "--json")
    assert proc.returncode == 0, proc.stderr
    (done,) = [json.loads(p.read_text()) for p in out.glob("runs/*/record.json")]
    assert done["config"]["model"]["n_experts"] == 4
    study = optuna.load_study(study_name="queued", storage=f"sqlite:///{out / 'sweep.db'}")
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs["config"]["model"]["n_experts"] == 2


def test_a_silent_worker_on_another_machine_is_recovered_after_the_grace_period(reference, tmp_path):
    grid, out = copy_reference(reference, tmp_path)
    interrupted = kill_midway(grid, out, workers=1, after_completed=0)
    storage = f"sqlite:///{out / 'sweep.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    (trial,) = study.get_trials(states=(TrialState.RUNNING,))
    assert trial.user_attrs["run_id"] == interrupted
    # as if its worker ran elsewhere: no process to look up, only its heartbeats tell
    study._storage.set_trial_user_attr(trial._trial_id, "worker",
                                       {"host": "another-machine/boot", "pid": 1, "start": "0"})
    rerun = run_cli("run", grid, "--out", out, "--quiet", "--grace-period", 3)
    assert rerun.returncode == 0, rerun.stderr
    ids = json.loads((out / "sweep.json").read_text())["runs"]
    runs = assert_exactly_once(out, storage, "tiny", {rid: "completed" for rid in ids})
    assert runs.set_index("run_id").loc[interrupted, "attempts"] == 2
    assert [t.state for t in trials_by_run(storage, "tiny")[interrupted]] == [TrialState.FAIL,
                                                                             TrialState.COMPLETE]


@pytest.mark.parametrize("case, text, pattern", [
    ("unknown field", {"grid": {"n_expert": [2, 4]}},
     r"grid\.n_expert: unknown field; did you mean 'n_experts'"),
    ("invalid combination", {"grid": {"n_experts": [2, 4], "top_k": [1, 4]}},
     r"run 1 \(n_experts=2, top_k=4\): model\.top_k = 4: must be <= n_experts \(2\)"),
    ("malformed yaml", "name: x\ngrid: {n_experts: [2, 4}\n", r"not valid YAML"),
    ("unsafe exclude", {"grid": {"n_experts": [2]}, "exclude": ["__import__('os').system('touch /tmp/x')"]},
     r"exclude\[0\] = .*unsafe expression \(function call not allowed\)"),
    ("string bomb in exclude", {"grid": {"n_experts": [2, 4]}, "exclude": ["'ab' * n_experts * 10**8 == ''"]},
     r"run 0 \(n_experts=2\): exclude\[0\] = .*cannot be evaluated \(a string longer than 10000 "
     r"characters\); fix the expression"),
    ("power tower in exclude", {"grid": {"n_experts": [2]}, "exclude": ["2**2**2**2**2**2 > n_experts"]},
     r"exclude\[0\] = .*cannot be evaluated \(exponent 65536 above 64\)"),
    ("deep exclude", {"grid": {"n_experts": [2]}, "exclude": ["-" * 10_000 + "n_experts > 0"]},
     r"exclude\[0\] = '-----.*\(10013 characters\): longer than 1000 characters"),
])
def test_bad_grid_exits_2_with_one_line_and_writes_nothing(tmp_path, case, text, pattern):
    if isinstance(text, str):
        grid = tmp_path / "bad.yaml"
        grid.write_text(text)
    else:
        grid = write_grid(tmp_path, "bad", **text)
    before = sorted(tmp_path.rglob("*"))
    for command in (["validate", grid], ["run", grid, "--out", tmp_path / "out"]):
        proc = run_cli(*command, timeout=60)
        assert proc.returncode == 2, (case, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moe-sweep: error: "), proc.stderr
        assert re.search(pattern, lines[0]), lines[0]
        assert proc.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before                    # not even --out was created


def test_resuming_a_run_on_a_changed_corpus_exits_2_and_writes_nothing(tmp_path):
    """A run recorded as started on other corpus content is not resumed: one line, exit 2."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be " * 2000)
    grid = write_grid(tmp_path, "moved", data={"corpus": "corpus.txt"}, grid={"n_experts": [2]})
    out = tmp_path / "out"
    from moe_scaling.sweep.layout import SweepDir
    from moe_scaling.sweep.results import write_record
    from moe_scaling.sweep.runner import plan_sweep
    from moe_scaling.train.data import corpus_content_hash

    run = plan_sweep(grid).runs[0]
    started = corpus_content_hash(str(corpus))
    write_record(out, {"run_id": run.run_id, "status": "running", "config": run.to_dict(),
                       "corpus_hash": started})
    SweepDir(out).manifest.write_text(json.dumps({"name": "moved", "runs": [run.run_id]}))
    corpus.write_text("that is the question " * 2000)
    now = corpus_content_hash(str(corpus))
    before = sorted(tmp_path.rglob("*"))
    proc = run_cli("run", grid, "--out", out, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-sweep: error: data.corpus = 'corpus.txt': "), lines
    assert f"hash {started[:8]} then, {now[:8]} now" in lines[0] and run.run_id in lines[0]
    assert "restore the original corpus files, or start a new --out folder" in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_a_record_worker_is_gone_when_no_process_or_a_later_one_has_its_id():
    """A record names its worker only as host:pid; an id is reused, so a process that started after
    the run did is not its worker. Checked against real processes."""
    host, now = socket.gethostname(), datetime.now(timezone.utc)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not record_worker_gone(f"{host}:{child.pid}", now.isoformat())           # alive, began before
        # the same id, but the run began an hour before this process: a reused id
        assert record_worker_gone(f"{host}:{child.pid}", (now - timedelta(hours=1)).isoformat())
        assert not record_worker_gone(f"another-host:{child.pid}", now.isoformat())     # not this machine's to judge
    finally:
        child.kill()
        child.wait()
    assert record_worker_gone(f"{host}:{child.pid}", now.isoformat())                   # gone
    assert not record_worker_gone(None, now.isoformat()) and not record_worker_gone(f"{host}:x", now.isoformat())


def test_progress_files_are_per_worker_process_and_a_gone_workers_file_is_dropped(tmp_path):
    """Two ``moe-sweep run`` commands on one folder each had a worker 0 writing ``progress/0.json``,
    and each command's start deleted every progress file. Now a file names its worker process: a
    start clears only the files of workers on this machine that have gone (and files of the old
    form), and the progress line reads the live workers of every command. Real processes."""
    from moe_scaling.sweep.layout import SweepDir
    from moe_scaling.sweep.progress import Progress, clear_gone, read_snapshot
    from moe_scaling.sweep.queue import WorkerContext

    ctx = WorkerContext(out=str(tmp_path), storage_url="sqlite://", study_name="s", grid_dir=".", total=3,
                        n_workers=1)
    progress = SweepDir(tmp_path).progress
    progress.mkdir()
    mine = Progress(ctx, None)
    mine.start_run("here", "run 1")
    child = (f"from moe_scaling.sweep.progress import Progress; from moe_scaling.sweep.queue import WorkerContext; "
             f"p = Progress(WorkerContext(out={str(tmp_path)!r}, storage_url='sqlite://', study_name='s', "
             f"grid_dir='.', total=3), None); p.start_run('gone', 'run 2')")
    subprocess.run([sys.executable, "-c", child], check=True, cwd=REPO)        # wrote its file, then exited
    remote = {"host": "another-machine/boot", "pid": 1, "start": "7"}
    (progress / "another-machine-1-7.json").write_text(json.dumps({"worker": remote, "run_id": "remote"}))
    (progress / "0.json").write_text(json.dumps({"run_id": "old"}))             # an older release's file
    assert len(list(progress.glob("*.json"))) == 4 and mine.path.name != "0.json"

    study = optuna.create_study()
    assert {s["run_id"] for s in read_snapshot(ctx, study)["states"]} == {"here", "remote"}
    clear_gone(tmp_path)
    assert sorted(p.name for p in progress.glob("*.json")) == sorted([mine.path.name, "another-machine-1-7.json"])
    snap = read_snapshot(ctx, study)
    assert {s["run_id"] for s in snap["states"]} == {"here", "remote"} and snap["n_workers"] == 2
    assert all("worker" not in s for s in snap["states"])
    mine.idle()                                                                  # idle: the file stays, no run
    assert json.loads(mine.path.read_text()) == {"worker": mine.who}
    assert {s["run_id"] for s in read_snapshot(ctx, study)["states"]} == {"remote"}
