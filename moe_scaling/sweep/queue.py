"""The work queue of a sweep: an optuna RDB storage whose enqueued trials are the runs.

The queue is an optuna storage (``sqlite:///DIR/sweep.db`` by default, any optuna RDB URL such
as ``postgresql://user@host/db`` for workers on many machines). Each resolved run of the grid
(:mod:`moe_scaling.sweep.grid`) is one *enqueued* trial whose user attributes carry its run id and
its full resolved config (and, flat, the fields a user filters by in optuna-dashboard), so any
worker that can reach the storage can run it. The sampler is
never used: workers claim WAITING trials with the storage's atomic WAITING -> RUNNING transition
(:func:`claim_next`).

This module owns the storage URL checks, opening the study, enqueueing and re-enqueueing runs,
claims, heartbeats, worker liveness (:func:`recover_stale`) and the per-run counts. How the
queue is filled and worked is :mod:`moe_scaling.sweep.runner`.

A run's trial ends in the state of its status (:data:`END_STATES`): ``completed`` is COMPLETE with
the final eval loss as its value, ``diverged`` is PRUNED (stopped by its own curve), ``failed`` is
FAIL; its eval losses are the trial's intermediate values by step while it runs.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from moe_scaling.errors import ConfigError
from moe_scaling.sweep.liveness import identity, process_gone

__all__ = ["HEARTBEAT_S", "DEFAULT_GRACE_S", "END_STATUSES", "END_STATES", "WorkerContext", "check_storage_url",
           "open_study", "enqueue_run", "trials_by_run", "needs_enqueue", "redact", "recover_stale",
           "claim", "claim_next", "claim_group", "superseded", "finish_trial", "sweep_counts", "Heartbeat",
           "no_experimental_warning"]

HEARTBEAT_S = 5          # optuna heartbeat interval of a running trial
DEFAULT_GRACE_S = 60     # a heartbeat older than this marks a trial of another host as dead
SCHEMA_TRIES = 5         # tries to open a storage whose tables another process is creating
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
RUN_ATTRS = ("run_id", "index", "label", "config", "sweep", "axes")
END_STATUSES = ("completed", "diverged", "failed")
END_STATES = {"completed": TrialState.COMPLETE, "diverged": TrialState.PRUNED, "failed": TrialState.FAIL,
              "duplicate": TrialState.PRUNED}
"""The trial state each end status closes a trial in (``duplicate``: a second trial of one run)."""


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
    batch: bool = True          # train runs that differ only in seed/lr together (train/group.py)
    run_ids: frozenset[str] | None = None   # the runs this worker may claim (the grid's, after --only)
    run_steps: Mapping[str, int] | None = None   # their optimizer steps, for the progress line's ETA


def check_storage_url(url: str) -> None:
    """A :class:`ConfigError` unless ``url`` is an optuna RDB URL of a supported database."""
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
    for attempt in range(SCHEMA_TRIES):
        try:
            with no_experimental_warning():
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                     grace_period=grace_s,
                                                     heartbeat_stale_trial_callback=_requeue)
            break
        except ImportError:
            raise ConfigError(f"--storage = {redact(url)!r}: the database driver is not installed; "
                              "pip install 'moe-scaling[postgres]' (psycopg) for postgresql://") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # several processes creating optuna's tables in an empty database at once: PostgreSQL
            # refuses all but one (pg_type's unique index, "relation already exists"; 6 of 8
            # processes started together failed); the next try finds the tables made
            if attempt == SCHEMA_TRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _begin_immediate(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def no_experimental_warning() -> Iterator[None]:
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


def enqueue_run(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    """Enqueue one run (its id, index, label, config, sweep name, ``retry_of`` and ``retry_failed``:
    true when queued by ``--retry-failed``, so that a run whose record says failed trains)."""
    keep = RUN_ATTRS + ("retry_of", "retry_failed")
    user = {k: attrs[k] for k in keep if k in attrs}
    user.update(attrs.get("axes") or {})          # flat: one dashboard column per field
    study.enqueue_trial(params={}, user_attrs=user)


def _requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Stale-trial callback: enqueue a fresh copy of a run whose trial was failed as stale, unless
    its worker had already recorded the run's end (it died while closing the trial)."""
    if "run_id" in trial.user_attrs and trial.user_attrs.get("status") not in END_STATUSES:
        enqueue_run(study, dict(trial.user_attrs) | {"retry_of": trial.number})


def _ended(trial: FrozenTrial) -> bool:
    """The run of this trial reached its end: COMPLETE, PRUNED as diverged, or FAIL after its
    worker recorded an end status (an exception, or a crash between recording the status and
    closing the trial)."""
    return trial.state == TrialState.COMPLETE or (
        trial.state in (TrialState.FAIL, TrialState.PRUNED) and trial.user_attrs.get("status") in END_STATUSES)


def trials_by_run(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    """Every trial of the study that carries a run, grouped by run id."""
    trials: dict[str, list[FrozenTrial]] = defaultdict(list)
    for t in study.get_trials(deepcopy=False):
        if "run_id" in t.user_attrs:
            trials[t.user_attrs["run_id"]].append(t)
    return trials


def needs_enqueue(trials: list[FrozenTrial], retry_failed: bool) -> bool:
    """True when a run with these trials has none waiting, running or ended (or, with
    ``retry_failed``, only failed ones)."""
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        return False
    ends = {t.user_attrs.get("status") if t.state != TrialState.COMPLETE else "completed"
            for t in trials if _ended(t)}
    if ends - {"failed"}:
        return False
    return retry_failed or not ends


def redact(url: str) -> str:
    """The storage URL without its password (for the manifest and messages)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}@{host}"


def _dead(trial: FrozenTrial, grace_s: int) -> bool:
    """True when a RUNNING trial's worker is known dead: same host and its process is gone, or it
    never recorded who runs it and started longer than the grace period ago."""
    who = trial.user_attrs.get("worker")
    if who is None:
        start = trial.datetime_start
        return start is not None and datetime.now() - start > timedelta(seconds=grace_s)
    return process_gone(who)


def recover_stale(study: optuna.Study, grace_s: int = DEFAULT_GRACE_S) -> int:
    """Fail and re-enqueue the RUNNING trials whose worker died (see :func:`_dead`) or whose
    heartbeat is older than the grace period. Returns how many this call re-enqueued."""
    storage = study._storage
    n = 0
    with no_experimental_warning():
        optuna.storages.fail_stale_trials(study)  # heartbeats: fails them and calls _requeue
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "run_id" not in t.user_attrs or not _dead(t, grace_s):
            continue
        status = t.user_attrs.get("status")
        # died while closing a finished run: close it as the run ended; else it failed (re-enqueued)
        state = END_STATES.get(status, TrialState.FAIL)
        values = [t.user_attrs.get("objective", math.inf)] if state == TrialState.COMPLETE else None
        try:
            ok = storage.set_trial_state_values(t._trial_id, state, values)
        except UpdateFinishedTrialError:  # another process recovered it first
            continue
        if ok and state == TrialState.FAIL and status is None:
            _requeue(study, t)
            n += 1
    return n


def claim(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    """Atomically move one WAITING trial to RUNNING for this process; None when another process
    claimed it first."""
    storage = study._storage
    try:
        if storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
            storage.record_heartbeat(trial._trial_id)
            storage.set_trial_user_attr(trial._trial_id, "worker", identity())
            return storage.get_trial(trial._trial_id)
    except UpdateFinishedTrialError:
        pass
    return None


def claim_next(study: optuna.Study, run_ids: Collection[str] | None = None) -> FrozenTrial | None:
    """Atomically move the lowest-numbered WAITING trial to RUNNING and return it (None if none).
    ``run_ids``: claim only trials of these runs (None: any), so that a worker given a subset of the
    grid (``--only``) leaves the queue's other waiting runs to the workers that asked for them."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if run_ids is not None and t.user_attrs.get("run_id") not in run_ids:
            continue
        claimed = claim(study, t)
        if claimed is not None:
            return claimed
    return None


def claim_group(study: optuna.Study, group_key: Callable[[FrozenTrial], str | None],
                limit: Callable[[FrozenTrial], int], run_ids: Collection[str] | None = None) -> list[FrozenTrial]:
    """Claim the lowest-numbered WAITING trial (as :func:`claim_next`), then, in trial order, the
    other WAITING trials with the same ``group_key`` (None: a trial that trains alone), up to
    ``limit(first)`` trials in all. Each claim is atomic, so a trial is never claimed twice; two
    processes claiming at once may split a group between them (the runner serialises its local
    workers' claims, so one machine forms whole groups). Returns the claimed trials, first one
    first (empty when nothing is waiting)."""
    first = claim_next(study, run_ids)
    if first is None:
        return []
    key, size = group_key(first), limit(first)
    claimed = [first]
    if key is None or size <= 1:
        return claimed
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if len(claimed) >= size:
            break
        if run_ids is not None and t.user_attrs.get("run_id") not in run_ids:
            continue
        if group_key(t) == key and (got := claim(study, t)) is not None:
            claimed.append(got)
    return claimed


def superseded(study: optuna.Study, mine: FrozenTrial) -> bool:
    """True when another trial of the same run is complete, or running with a lower number."""
    rid = mine.user_attrs["run_id"]
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if t.user_attrs.get("run_id") == rid and t.number != mine.number:
            if t.state == TrialState.COMPLETE or t.number < mine.number:
                return True
    return False


def sweep_counts(study: optuna.Study, run_ids: set[str] | None = None) -> dict[str, Any]:
    """Per-run state from the storage: ``done`` (completed, diverged or failed), ``failed`` (the
    runs whose latest end is ``failed``), ``done_ids``, ``running``, ``walls`` (wall seconds of finished runs,
    by run id)
    and ``starts`` (start times of running runs)."""
    done: set[str] = set()
    last_end: dict[str, tuple[int, Any]] = {}
    running: dict[str, datetime] = {}
    walls: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False):
        rid = t.user_attrs.get("run_id")
        if rid is None or (run_ids is not None and rid not in run_ids):
            continue
        if _ended(t) and t.number > last_end.get(rid, (-1, None))[0]:
            last_end[rid] = (t.number, t.user_attrs.get("status"))
        if _ended(t) and rid not in done:
            done.add(rid)
            if t.user_attrs.get("wall_s") is not None:
                walls[rid] = float(t.user_attrs["wall_s"])
        elif t.state == TrialState.RUNNING and t.datetime_start is not None:
            running[rid] = t.datetime_start
    failed = sorted(rid for rid, (_, status) in last_end.items() if status == "failed")
    return {"done": len(done), "done_ids": done, "failed": failed, "running": running, "walls": walls}


def finish_trial(study: optuna.Study, trial: FrozenTrial, state: TrialState, record: Mapping[str, Any],
                 value: float | None = None) -> None:
    """Close ``trial`` in ``state`` (value ``value``) with the record's results as user attributes;
    ``status`` is written last, so a trial that has it reached its end."""
    storage = study._storage
    attrs = {k: record.get(k) for k in ("eval_loss", "wall_s", "error")} | {"objective": value}
    for key, v in attrs.items():
        if v is not None:
            storage.set_trial_user_attr(trial._trial_id, key, v)
    storage.set_trial_user_attr(trial._trial_id, "status", record["status"])  # last: marks the end
    storage.set_trial_state_values(trial._trial_id, state, None if value is None else [value])


class Heartbeat:
    """Records an optuna heartbeat for each of ``trial_ids`` (one id or a list: the members of a
    group) every HEARTBEAT_S seconds in a daemon thread."""

    def __init__(self, storage: Any, trial_ids: int | Sequence[int]) -> None:
        self._storage = storage
        self._trial_ids = [trial_ids] if isinstance(trial_ids, int) else list(trial_ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for trial_id in self._trial_ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried; the grace period absorbs it
                    pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
