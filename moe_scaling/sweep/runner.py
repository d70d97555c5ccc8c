"""Sweeps: run every point of a grid file exactly once, across workers, crashes and restarts.

The work queue is an optuna storage (``sqlite:///DIR/sweep.db`` by default, any optuna RDB URL such
as ``postgresql://user@host/db`` for workers on many machines). Each resolved run of the grid
(:mod:`moe_scaling.sweep.grid`) is one *enqueued* trial whose user attributes carry its run id and its full
resolved config, so any worker that can reach the storage can run it. The sampler is never used:
workers claim WAITING trials with the storage's atomic WAITING -> RUNNING transition, and stop when
nothing is waiting or running.

Guarantees and how they are kept:

* **Exactly once.** :func:`prepare` enqueues a run only when no trial of it is waiting, running or
  complete (a run that failed with an exception is re-enqueued only with ``retry_failed``). Should two
  machines enqueue the same run at the same moment, the worker that claims a trial checks for another
  trial of the same run that is complete or running with a lower trial number and then drops its own
  (state PRUNED, status ``duplicate``), so one trial per run trains.
* **Crash safety.** A worker records optuna heartbeats for its trial every few seconds and stores its
  host and process id on the trial. A RUNNING trial whose process is gone (same host: checked at once
  through ``/proc``) or whose heartbeat is older than the grace period (any host) is set to FAIL and
  re-enqueued; the new trial resumes from the orbax checkpoint in ``DIR/runs/<run_id>/ckpt``. A run
  whose record already says completed/diverged is closed from its record, never trained again.
* **Divergence and errors.** A diverged run (``train`` returns status ``diverged``) is COMPLETE in
  the storage (value +inf) and ``diverged`` in the tables; an exception inside one run is recorded as
  ``failed`` with its message (traceback in ``DIR/runs/<run_id>/error.txt``) and the sweep goes on.
* **Compilation reuse.** Workers enable JAX's persistent compilation cache in ``DIR/jax_cache`` so
  runs with identical shapes (seeds, learning rates, ...) and restarted sweeps skip recompiling.

Results go to per-run record files and the tables of :mod:`moe_scaling.sweep.results`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

import moe_scaling
from moe_scaling.files import write_json
from moe_scaling.runtime import enable_compilation_cache
from moe_scaling.config import save_config
from moe_scaling.files import atomic_write_text
from moe_scaling.errors import ConfigError
from moe_scaling.sweep.grid import GridSpec, RunSpec, expand_grid, load_grid, resolve_corpus
from moe_scaling.sweep.results import (MANIFEST_FILE, code_version, read_record,
                                 rebuild_tables, run_dir, write_curve, write_record)

__all__ = ["SweepPlan", "plan_sweep", "default_storage", "check_storage_url", "open_study", "prepare",
           "run_sweep", "worker_loop", "recover_stale", "claim_next", "sweep_counts", "WorkerContext",
           "Progress", "snapshot", "read_snapshot"]

HEARTBEAT_S = 5          # optuna heartbeat interval of a running trial
DEFAULT_GRACE_S = 60     # a heartbeat older than this marks a trial of another host as dead
POLL_S = 1.0             # idle workers poll the queue this often while other runs are in flight
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
RUN_ATTRS = ("run_id", "index", "label", "config", "sweep")
END_STATUSES = ("completed", "diverged", "failed")


@dataclass(frozen=True)
class SweepPlan:
    """A grid file resolved into validated runs (nothing written yet)."""

    spec: GridSpec
    runs: list[RunSpec]


def plan_sweep(grid_path: str | os.PathLike) -> SweepPlan:
    """Load, expand and validate a grid file; raises :class:`ConfigError` on any bad point."""
    spec = load_grid(grid_path)
    return SweepPlan(spec, expand_grid(spec))


def default_storage(out: str | os.PathLike) -> str:
    return f"sqlite:///{Path(out).resolve() / 'sweep.db'}"


def check_storage_url(url: str) -> None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"--storage = {url!r}: not an optuna RDB URL; use sqlite:///path/sweep.db or "
                          "postgresql://user:password@host:port/db")


# --------------------------------------------------------------------------------------
# Storage and queue
# --------------------------------------------------------------------------------------


def _storage(url: str, grace_s: int) -> optuna.storages.RDBStorage:
    """The optuna RDB storage with heartbeats. On SQLite every transaction is ``BEGIN IMMEDIATE``:
    Python's sqlite3 module otherwise runs a transaction's first SELECT outside it, so two
    processes can both read a trial as WAITING and both claim it (measured: 14 double claims in
    150 with three processes). PostgreSQL's ``SELECT ... FOR UPDATE`` needs nothing extra."""
    sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = ({"connect_args": {"timeout": 300, "isolation_level": None}} if sqlite
                              else {"pool_pre_ping": True})
    try:
        with _no_experimental_warning():
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=grace_s,
                                                 heartbeat_stale_trial_callback=_requeue)
    except ImportError:
        raise ConfigError(f"--storage = {_redact(url)!r}: the database driver is not installed; "
                          "pip install 'moe-scaling[postgres]' (psycopg) for postgresql://") from None
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _begin_immediate(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def _no_experimental_warning() -> Iterator[None]:
    """Heartbeats are "experimental" in optuna 5 (since 2.9); the warning says nothing a user can
    act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_study(url: str, name: str, grace_s: int = DEFAULT_GRACE_S, create: bool = False) -> optuna.Study:
    """Load (or with ``create``, create if missing) the study ``name``; safe when several
    processes create it at once."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url, grace_s)
    if not create:
        return optuna.load_study(study_name=name, storage=storage)
    attempt = 0
    while True:
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                       load_if_exists=True)
        except Exception:  # noqa: BLE001 - a concurrent creator won the race; load on the next try
            attempt += 1
            if attempt == 5:
                raise
            time.sleep(0.5 * attempt)


def _enqueue(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    keep = RUN_ATTRS + ("retry_of",)
    study.enqueue_trial(params={}, user_attrs={k: attrs[k] for k in keep if k in attrs})


def _requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Stale-trial callback: enqueue a fresh copy of a run whose trial was failed as stale, unless
    its worker had already recorded the run's end (it died while closing the trial)."""
    if "run_id" in trial.user_attrs and trial.user_attrs.get("status") not in END_STATUSES:
        _enqueue(study, dict(trial.user_attrs) | {"retry_of": trial.number})


def _ended(trial: FrozenTrial) -> bool:
    """The run of this trial reached its end: COMPLETE, or FAIL after its worker recorded an end
    status (an exception, or a crash between recording the status and closing the trial)."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("status") in END_STATUSES)


def _by_run(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    trials: dict[str, list[FrozenTrial]] = defaultdict(list)
    for t in study.get_trials(deepcopy=False):
        if "run_id" in t.user_attrs:
            trials[t.user_attrs["run_id"]].append(t)
    return trials


def _needs_enqueue(trials: list[FrozenTrial], retry_failed: bool) -> bool:
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        return False
    ends = {t.user_attrs.get("status") if t.state == TrialState.FAIL else "completed"
            for t in trials if _ended(t)}
    if ends - {"failed"}:
        return False
    return retry_failed or not ends


def prepare(plan: SweepPlan, out: str | os.PathLike, storage_url: str | None = None, *,
            retry_failed: bool = False, grace_s: int = DEFAULT_GRACE_S) -> tuple[optuna.Study, str]:
    """Create ``out`` and its manifest, create the study, recover dead trials and enqueue every run
    not yet waiting/running/complete. Returns (study, storage URL)."""
    out = Path(out)
    manifest_path = out / MANIFEST_FILE
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if old and old.get("name") != plan.spec.name:
        raise ConfigError(f"--out {out}: holds sweep {old.get('name')!r}, not {plan.spec.name!r}; "
                          "use another --out folder")
    url = storage_url or default_storage(out)
    if storage_url is None:
        out.mkdir(parents=True, exist_ok=True)     # the default SQLite file lives in it
    study = open_study(url, plan.spec.name, grace_s, create=True)   # an unreachable server stops here
    out.mkdir(parents=True, exist_ok=True)
    ids = [r.run_id for r in plan.runs]
    known = [r for r in (old or {}).get("runs", []) if r not in set(ids)]
    write_json(manifest_path, {"name": plan.spec.name, "grid": str(plan.spec.path.resolve()),
                                      "storage": _redact(url), "runs": known + ids})
    atomic_write_text(out / "grid.yaml", plan.spec.path.read_text())
    recover_stale(study, grace_s)
    trials = _by_run(study)
    for run in plan.runs:
        if _needs_enqueue(trials.get(run.run_id, []), retry_failed):
            _enqueue(study, {"run_id": run.run_id, "index": run.index, "label": run.label,
                             "config": run.to_dict(), "sweep": plan.spec.name})
    return study, url


def _redact(url: str) -> str:
    """The storage URL without its password (for the manifest)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}@{host}"


_HOST_ID: str | None = None


def _host_id() -> str:
    """This machine: hostname plus the kernel boot id (distinguishes containers and reboots)."""
    global _HOST_ID
    if _HOST_ID is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        _HOST_ID = f"{socket.gethostname()}/{boot}"
    return _HOST_ID


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot) or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    return None if rest[0] in ("Z", "X") else rest[19]


def _identity() -> dict[str, Any]:
    return {"host": _host_id(), "pid": os.getpid(), "start": _proc_start(os.getpid())}


def _dead(trial: FrozenTrial, grace_s: int) -> bool:
    """True when a RUNNING trial's worker is known dead: same host and its process is gone, or it
    never recorded who runs it and started longer than the grace period ago."""
    who = trial.user_attrs.get("worker")
    if who is None:
        start = trial.datetime_start
        return start is not None and datetime.now() - start > timedelta(seconds=grace_s)
    if who.get("host") != _host_id() or not Path("/proc").is_dir():
        return False
    return _proc_start(who["pid"]) != who.get("start")


def recover_stale(study: optuna.Study, grace_s: int = DEFAULT_GRACE_S) -> int:
    """Fail and re-enqueue the RUNNING trials whose worker died (see :func:`_dead`) or whose
    heartbeat is older than the grace period. Returns how many this call re-enqueued."""
    storage = study._storage
    n = 0
    with _no_experimental_warning():
        optuna.storages.fail_stale_trials(study)  # heartbeats: fails them and calls _requeue
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "run_id" not in t.user_attrs or not _dead(t, grace_s):
            continue
        status = t.user_attrs.get("status")
        if status in ("completed", "diverged"):   # died while closing a finished run: close it
            state, values = TrialState.COMPLETE, [t.user_attrs.get("objective", math.inf)]
        elif status == "failed":
            state, values = TrialState.FAIL, None
        else:
            state, values = (TrialState.PRUNED if status == "duplicate" else TrialState.FAIL), None
        try:
            ok = storage.set_trial_state_values(t._trial_id, state, values)
        except UpdateFinishedTrialError:  # another process recovered it first
            continue
        if ok and state == TrialState.FAIL and status is None:
            _requeue(study, t)
            n += 1
    return n


def claim_next(study: optuna.Study) -> FrozenTrial | None:
    """Atomically move the lowest-numbered WAITING trial to RUNNING and return it (None if none)."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                storage.record_heartbeat(t._trial_id)
                storage.set_trial_user_attr(t._trial_id, "worker", _identity())
                return storage.get_trial(t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def _superseded(study: optuna.Study, mine: FrozenTrial) -> bool:
    rid = mine.user_attrs["run_id"]
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if t.user_attrs.get("run_id") == rid and t.number != mine.number:
            if t.state == TrialState.COMPLETE or t.number < mine.number:
                return True
    return False


def sweep_counts(study: optuna.Study, run_ids: set[str] | None = None) -> dict[str, Any]:
    """Per-run state from the storage: ``done`` (completed, diverged or failed), ``running``,
    ``walls`` (wall seconds of finished runs) and ``starts`` (start times of running runs)."""
    done: set[str] = set()
    running: dict[str, datetime] = {}
    walls: list[float] = []
    for t in study.get_trials(deepcopy=False):
        rid = t.user_attrs.get("run_id")
        if rid is None or (run_ids is not None and rid not in run_ids):
            continue
        if _ended(t) and rid not in done:
            done.add(rid)
            if t.user_attrs.get("wall_s") is not None:
                walls.append(float(t.user_attrs["wall_s"]))
        elif t.state == TrialState.RUNNING and t.datetime_start is not None:
            running[rid] = t.datetime_start
    return {"done": len(done), "running": running, "walls": walls}


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process needs: where results go and which queue to pull from."""

    out: str
    storage_url: str
    study_name: str
    grid_dir: str
    total: int
    grace_s: int = DEFAULT_GRACE_S
    worker: int = 0
    n_workers: int = 1


class _Heartbeat:
    """Records an optuna heartbeat for one trial every HEARTBEAT_S seconds in a daemon thread."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the grace period absorbs it
                pass

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def worker_loop(ctx: WorkerContext, report: Report | None = None) -> int:
    """Claim and run trials until none is waiting or running; ``report`` gets progress snapshots.
    Returns the number of runs this worker trained."""
    enable_compilation_cache(Path(ctx.out) / "jax_cache")
    from moe_scaling.train.loop import train as train_fn
    study = open_study(ctx.storage_url, ctx.study_name, ctx.grace_s)
    reporter = Progress(ctx, study, report)
    n = 0
    while True:
        recover_stale(study, ctx.grace_s)
        trial = claim_next(study)
        if trial is None:
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                break
            reporter.idle()
            time.sleep(POLL_S)
            continue
        n += _execute(ctx, study, trial, train_fn, reporter)
    reporter.idle()
    return n


def _finish(study: optuna.Study, trial: FrozenTrial, state: TrialState, record: Mapping[str, Any],
            value: float | None = None) -> None:
    storage = study._storage
    attrs = {k: record.get(k) for k in ("eval_loss", "wall_s", "error")} | {"objective": value}
    for key, v in attrs.items():
        if v is not None:
            storage.set_trial_user_attr(trial._trial_id, key, v)
    storage.set_trial_user_attr(trial._trial_id, "status", record["status"])  # last: marks the end
    storage.set_trial_state_values(trial._trial_id, state, None if value is None else [value])


def _execute(ctx: WorkerContext, study: optuna.Study, trial: FrozenTrial,
             train_fn: Callable[..., Any], reporter: "Progress") -> int:
    """Run one claimed trial to its end state; returns 1 when it trained, else 0."""
    if _superseded(study, trial):
        _finish(study, trial, TrialState.PRUNED, {"status": "duplicate"})
        return 0
    run = RunSpec.from_dict(trial.user_attrs["config"], index=trial.user_attrs.get("index", 0))
    rid = trial.user_attrs["run_id"]
    if run.run_id != rid:
        raise RuntimeError(f"trial {trial.number}: config hashes to {run.run_id}, not {rid}")
    previous = read_record(ctx.out, rid)
    if previous and previous["status"] in ("completed", "diverged"):
        _finish(study, trial, TrialState.COMPLETE, previous, _objective(previous))
        rebuild_tables(ctx.out)
        return 0
    rdir = run_dir(ctx.out, rid)
    save_config(rdir / "config.yaml", run.model, run.train, run.data)
    record: dict[str, Any] = {
        "run_id": rid, "sweep": ctx.study_name, "status": "running", "label": trial.user_attrs.get("label"),
        "attempts": (previous or {}).get("attempts", 0) + 1, "trial": trial.number,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "started_at": _now(), "finished_at": None,
        "config": run.to_dict(), "package_version": moe_scaling.__version__,
        "code_version": code_version()}
    write_record(ctx.out, record)
    rebuild_tables(ctx.out)
    data = dataclasses.replace(run.data, corpus=resolve_corpus(run.data.corpus, ctx.grid_dir))
    reporter.start_run(rid, trial.user_attrs.get("label", rid))
    with _Heartbeat(study._storage, trial._trial_id):
        try:
            result = train_fn(run.model, run.train, data, ckpt_dir=rdir / "ckpt", progress=False,
                              on_log=reporter.log)
        except Exception as err:  # noqa: BLE001 - one run's exception is its result, not the sweep's
            atomic_write_text(rdir / "error.txt", traceback.format_exc())
            message = " ".join(str(err).split())[:500]
            record.update(status="failed", error=f"{type(err).__name__}: {message}", finished_at=_now())
            write_record(ctx.out, record)
            rebuild_tables(ctx.out)
            _finish(study, trial, TrialState.FAIL, record)
            reporter.end_run(record)
            return 1
    record.update(_result_fields(result), finished_at=_now())
    write_curve(ctx.out, rid, result.curve)
    write_record(ctx.out, record)
    rebuild_tables(ctx.out)
    _finish(study, trial, TrialState.COMPLETE, record, _objective(record))
    reporter.end_run(record)
    return 1


def _result_fields(result: Any) -> dict[str, Any]:
    status = result.status if result.status in ("completed", "diverged") else "failed"
    return {"status": status, "eval_loss": result.final_eval_loss, "best_eval_loss": result.best_eval_loss,
            "final_train_loss": result.final_train_loss, "tokens": result.tokens, "steps": result.steps,
            "diverged_step": result.diverged_step, "last_good_loss": result.last_good_loss,
            "wall_s": result.wall_s, "step_time_s": result.step_time_s,
            "tokens_per_s": result.tokens_per_s, "corpus_hash": result.corpus_hash,
            "metrics": dict(result.metrics or {})}


def _objective(record: Mapping[str, Any]) -> float:
    """The trial value: final eval loss (train loss if no eval), +inf for a diverged run."""
    if record["status"] != "completed":
        return math.inf
    for key in ("eval_loss", "final_train_loss"):
        v = record.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return math.inf


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _worker_main(ctx: WorkerContext) -> None:
    """Entry point of a spawned worker process."""
    try:
        worker_loop(ctx)
    except KeyboardInterrupt:
        sys.exit(130)


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


Report = Callable[[dict], None]


class Progress:
    """Live progress of one worker: its state (run, step, loss, tokens/s) goes to
    ``DIR/progress/<worker>.json`` on every log, and, in a single-worker sweep, to ``report`` as a
    :func:`snapshot` (with ``"event"``: ``"start"`` when a run starts, the run's record when it ends)."""

    def __init__(self, ctx: WorkerContext, study: optuna.Study, report: Report | None = None) -> None:
        self.ctx, self.study, self.report = ctx, study, report
        self.path = Path(ctx.out) / "progress" / f"{ctx.worker}.json"
        self.state: dict[str, Any] = {}
        self._counts: dict[str, Any] | None = None

    def _write(self, event: Any = None) -> None:
        write_json(self.path, self.state)
        if self.report is not None:
            if self._counts is None:
                self._counts = sweep_counts(self.study)
            self.report(snapshot(self.ctx, self._counts, [self.state]) | {"event": event})

    def start_run(self, rid: str, label: str) -> None:
        self._counts = None
        self.state = {"run_id": rid, "label": label, "step": 0, "steps": None, "loss": None,
                      "tokens_per_s": None, "started": time.time()}
        self._write("start")

    def log(self, entry: Mapping[str, Any]) -> None:
        for key, name in (("step", "step"), ("steps", "steps"), ("loss", "train_loss"),
                          ("tokens_per_s", "tokens_per_s")):
            if entry.get(name) is not None:
                self.state[key] = entry[name]
        self._write()

    def end_run(self, record: Mapping[str, Any]) -> None:
        self._counts = None
        self.state = {}
        self._write(dict(record))

    def idle(self) -> None:
        self.state = {}
        write_json(self.path, self.state)


def snapshot(ctx: WorkerContext, counts: Mapping[str, Any], states: list[Mapping[str, Any]]) -> dict:
    """What a progress line shows: ``total`` runs, ``done``, the ``states`` of the runs in flight
    (run_id, step, steps, loss, tokens_per_s), ``n_workers`` and ``eta_s`` (None until it can be
    estimated: the mean wall time of finished runs, else the in-flight runs' pace, times the runs
    left, over the workers)."""
    now = time.time()
    live = [s for s in states if s.get("run_id")]
    fractions = [(min((s.get("step") or 0) / s["steps"], 1.0), now - s.get("started", now))
                 for s in live if s.get("steps")]
    walls = counts["walls"]
    per_run = sum(walls) / len(walls) if walls else None
    if per_run is None:
        rates = [elapsed / f for f, elapsed in fractions if f > 0.05]
        per_run = sum(rates) / len(rates) if rates else None
    remaining = max(ctx.total - counts["done"] - sum(f for f, _ in fractions), 0.0)
    eta = None if per_run is None else remaining * per_run / max(ctx.n_workers, 1)
    return {"total": ctx.total, "done": counts["done"], "states": live, "n_workers": ctx.n_workers,
            "eta_s": eta}


def read_snapshot(ctx: WorkerContext, study: optuna.Study) -> dict:
    """A :func:`snapshot` from every worker's progress file and the storage."""
    states = []
    for path in sorted((Path(ctx.out) / "progress").glob("*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # a file being replaced; the next poll reads it
            continue
    return snapshot(ctx, sweep_counts(study), states) | {"event": None}


# --------------------------------------------------------------------------------------
# The whole sweep
# --------------------------------------------------------------------------------------


def run_sweep(grid_path: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1,
              storage: str | None = None, retry_failed: bool = False, grace_s: int = DEFAULT_GRACE_S,
              report: Report | None = None, plan: SweepPlan | None = None) -> dict[str, Any]:
    """Validate the grid, enqueue its runs and work the queue with ``workers`` local processes
    (in this process when 1) until nothing is waiting or running; ``report`` receives progress
    snapshots (see :class:`Progress`). Returns ``{"sweep", "out", "done", "total", "unfinished"}``;
    rerunning the same call after a crash finishes the sweep."""
    plan = plan or plan_sweep(grid_path)
    if storage is not None:
        check_storage_url(storage)
    study, url = prepare(plan, out, storage, retry_failed=retry_failed, grace_s=grace_s)
    ctx = WorkerContext(out=str(Path(out).resolve()), storage_url=url, study_name=plan.spec.name,
                        grid_dir=str(plan.spec.path.resolve().parent), total=len(plan.runs),
                        grace_s=grace_s, n_workers=workers)
    (Path(out) / "progress").mkdir(exist_ok=True)
    for stale in (Path(out) / "progress").glob("*.json"):
        stale.unlink()
    if workers == 1:
        worker_loop(ctx, report)
    else:
        _run_processes(ctx, study, workers, report)
    ids = {r.run_id for r in plan.runs}
    counts = sweep_counts(study, ids)
    rebuild_tables(out)
    return {"sweep": plan.spec.name, "out": str(out), "done": counts["done"], "total": len(ids),
            "unfinished": len(ids) - counts["done"]}


def _run_processes(ctx: WorkerContext, study: optuna.Study, workers: int, report: Report | None) -> None:
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_worker_main, args=(dataclasses.replace(ctx, worker=i),),
                        name=f"moe-sweep-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if report is not None:
                report(read_snapshot(ctx, study))
            for p in procs:
                p.join(timeout=POLL_S / len(procs))
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    failed = [p for p in procs if p.exitcode not in (0, None)]
    if failed:
        print(f"moe-sweep: {len(failed)} worker(s) exited with codes "
              f"{', '.join(str(p.exitcode) for p in failed)}", file=sys.stderr)
