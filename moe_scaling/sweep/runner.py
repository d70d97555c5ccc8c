"""Sweeps: run every point of a grid file exactly once, across workers, crashes and restarts.

The work queue is an optuna storage (:mod:`moe_scaling.sweep.queue`): every resolved run of the
grid is one enqueued trial, and workers claim WAITING trials atomically and stop when nothing is
waiting or running. This module plans a sweep, prepares its folder and queue, runs the worker
loop and one run, and starts the local worker processes. Paths inside the sweep folder are
:class:`moe_scaling.sweep.layout.SweepDir`'s.

Guarantees and how they are kept:

* **Exactly once.** :func:`prepare` enqueues a run only when no trial of it is waiting, running or
  complete (a run that failed with an exception is re-enqueued only with ``retry_failed``). Should two
  machines enqueue the same run at the same moment, the worker that claims a trial checks for another
  trial of the same run that is complete or running with a lower trial number and then drops its own
  (state PRUNED, status ``duplicate``), so one trial per run trains.
* **Crash safety.** A worker records optuna heartbeats for its trial every few seconds and stores its
  host and process id on the trial. A RUNNING trial whose process is gone (same host: checked at once
  through ``/proc``) or whose heartbeat is older than the grace period (any host) is set to FAIL and
  re-enqueued; the new trial resumes from the orbax checkpoint in the run's ``ckpt/``. A run
  whose record already says completed/diverged is closed from its record, never trained again; one
  whose record says failed trains only from a trial queued by ``--retry-failed``.
* **Same data.** A run's record holds its corpus content hash from the start; a sweep whose
  unfinished runs would resume on a corpus that changed since is a :class:`ConfigError` before
  anything is written (and :func:`moe_scaling.train.loop.train` refuses such a checkpoint too).
* **Divergence and errors.** A diverged run (``train`` returns status ``diverged``) is PRUNED in
  the storage (no value) and ``diverged`` in the tables; an exception inside one run is recorded as
  ``failed`` with its message (traceback in the run's ``error.txt``) and the sweep goes on.
* **Seed batching.** By default a worker claims a group: the next waiting run and the waiting runs
  that differ from it only in ``seed``, ``lr``, ``min_lr_ratio`` or ``weight_decay``
  (:func:`moe_scaling.train.batching.batch_key`), as many as
  :func:`moe_scaling.train.batching.group_size` allows, and trains them as one vmapped program
  (:func:`moe_scaling.train.group.train_group`). Each member keeps its own trial, heartbeat, record,
  curve and checkpoints and is closed as soon as it ends, so every guarantee above holds per run.
  Local workers claim under ``DIR/.claim.lock``, so one machine forms whole groups; an interrupted
  group is re-enqueued whole and resumes as the same program. ``batch=False`` (``--no-batch``)
  claims and trains one run at a time.
* **Compilation reuse.** Workers enable JAX's persistent compilation cache in ``DIR/jax_cache`` so
  runs with identical shapes (seeds, learning rates, ...) and restarted sweeps skip recompiling;
  compiled programs are also kept in the worker process and, serialized, in
  ``DIR/jax_cache/programs/`` (:func:`moe_scaling.train.loop.compiled`).

Results go to per-run record files and the tables of :mod:`moe_scaling.sweep.results`.

One module (~540 lines) on purpose: the sweep's set-up and each worker's claim / train / close
cycle carry the guarantees above together (a seam between them would split one guarantee across
files); the storage (:mod:`~moe_scaling.sweep.queue`), records and tables
(:mod:`~moe_scaling.sweep.results`), progress and worker liveness already live in their own modules.
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
import time
import traceback
from dataclasses import dataclass
from functools import partial
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

import moe_scaling
from moe_scaling.config import save_config
from moe_scaling.errors import ConfigError, UserError
from moe_scaling.files import atomic_write_text, exclusive_lock, write_json
from moe_scaling.runtime import enable_compilation_cache, exit_now
from moe_scaling.sweep.devices import assign_devices, detect_accelerators, pin_to_share, worker_env
from moe_scaling.sweep.grid import GridSpec, RunSpec, expand_grid, load_grid, resolve_corpus
from moe_scaling.sweep.layout import SweepDir
from moe_scaling.sweep.progress import Progress, Report, clear_gone, read_snapshot
from moe_scaling.sweep.exclude import DERIVED_PROPERTIES
from moe_scaling.sweep.queue import (DEFAULT_GRACE_S, END_STATES, Heartbeat, WorkerContext, check_storage_url,
                                     claim, claim_group, claim_next, enqueue_run, finish_trial, needs_enqueue,
                                     open_study, recover_stale, redact, superseded, sweep_counts, trials_by_run)
from moe_scaling.sweep.results import (code_version, read_record, rebuild_tables, restore_records, write_curve,
                                       write_record)
from moe_scaling.train.data import corpus_content_hash
from moe_scaling.train.batching import batch_key, group_size

__all__ = ["SweepPlan", "plan_sweep", "prepare", "close_finished", "check_corpora", "run_sweep", "worker_loop"]

POLL_S = 1.0             # idle workers poll the queue this often while other runs are in flight


@dataclass(frozen=True)
class SweepPlan:
    """A grid file resolved into validated runs (nothing written yet)."""

    spec: GridSpec
    runs: list[RunSpec]


def plan_sweep(grid_path: str | os.PathLike, only: str | None = None) -> SweepPlan:
    """Load, expand and validate a grid file; raises :class:`ConfigError` on any bad point.
    ``only``: keep just the runs for which this expression holds (:func:`expand_grid`)."""
    spec = load_grid(grid_path)
    return SweepPlan(spec, expand_grid(spec, only=only))


def prepare(plan: SweepPlan, out: str | os.PathLike, storage_url: str | None = None, *,
            retry_failed: bool = False, grace_s: int = DEFAULT_GRACE_S,
            log: Callable[[str], None] | None = None) -> tuple[optuna.Study, str]:
    """Create ``out`` and its manifest, restore the records of a folder that came without them
    (:func:`~moe_scaling.sweep.results.restore_records`: its tables keep their rows and its finished
    runs are not trained again; one line through ``log``), create the study, recover dead trials,
    enqueue every run not yet waiting/running/complete and close the waiting trials of runs whose
    record already says they ended (:func:`close_finished`). Returns (study, storage URL)."""
    out, layout = Path(out), SweepDir(out)
    old = json.loads(layout.manifest.read_text()) if layout.manifest.is_file() else None
    if old and old.get("name") != plan.spec.name:
        raise ConfigError(f"--out {out}: holds sweep {old.get('name')!r}, not {plan.spec.name!r}; "
                          "use another --out folder")
    whole = expand_grid(plan.spec)                 # every run of the grid, also those --only leaves out
    restored = restore_records(out, {r.run_id: r.to_dict() for r in whole})
    if restored and log is not None:
        log(f"restored {len(restored)} run record(s) from {layout.runs_table} (the folder came without its "
            f"runs/ records): runs that ended are not trained again")
    check_corpora(plan, out, retry_failed)
    url = storage_url or layout.default_storage
    if storage_url is None:
        out.mkdir(parents=True, exist_ok=True)     # the default SQLite file lives in it
    study = open_study(url, plan.spec.name, grace_s, create=True)   # an unreachable server stops here
    out.mkdir(parents=True, exist_ok=True)
    ids = [r.run_id for r in whole]               # grid order, whichever subset this call trains
    known = [r for r in (old or {}).get("runs", []) if r not in set(ids)]
    # paths relative to the folder and the default queue as null, so a folder committed or copied
    # elsewhere still names its own files (its grid copy is DIR/grid.yaml)
    grid = os.path.relpath(plan.spec.path.resolve(), out.resolve())
    write_json(layout.manifest, {"name": plan.spec.name, "grid": grid,
                                 "storage": None if storage_url is None else redact(url), "runs": known + ids})
    atomic_write_text(layout.grid, plan.spec.path.read_text())
    recover_stale(study, grace_s)
    trials = trials_by_run(study)
    for run in plan.runs:
        if needs_enqueue(trials.get(run.run_id, []), retry_failed):
            enqueue_run(study, {"run_id": run.run_id, "index": run.index, "label": run.label,
                                "config": run.to_dict(), "sweep": plan.spec.name, "axes": trial_axes(run),
                                "retry_failed": retry_failed})
    close_finished(study, out, {r.run_id for r in plan.runs}, retry_failed)
    return study, url


def close_finished(study: optuna.Study, out: str | os.PathLike, run_ids: Collection[str],
                   retry_failed: bool = False) -> int:
    """Close every WAITING trial of ``run_ids`` whose run's record already says it ended, from that
    record: a queue filled after its records were restored, or one that lost its closing writes.
    The progress line, its ETA and the dashboard count such a run as done from the start instead
    of when a worker reaches its trial. A failed run's trial is closed unless it is to train again
    (:func:`_ended_before`); with ``retry_failed`` its waiting trials are marked to. A second trial of a
    run is closed as a duplicate, as a worker would (:func:`superseded`). Returns the number closed."""
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        rid = trial.user_attrs.get("run_id")
        previous = read_record(out, rid) if rid in run_ids else None
        if previous and previous["status"] == "failed" and retry_failed:
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "retry_failed", True)
            except UpdateFinishedTrialError:       # a worker took and ended it meanwhile
                pass
        elif _ended_before(previous, trial) and (got := claim(study, trial)) is not None:
            _close_from_record(study, got, out, previous)
            closed += 1
    return closed


def _ended_before(record: Mapping[str, Any] | None, trial: FrozenTrial) -> bool:
    """True when the run of ``trial`` ended before it (its ``record``): completed or diverged, or
    failed and ``trial`` not queued by ``--retry-failed`` to train it again. Such a trial is closed
    from the record, never trained."""
    status = (record or {}).get("status")
    return status in ("completed", "diverged") or status == "failed" and not trial.user_attrs.get("retry_failed")


def _close_from_record(study: optuna.Study, trial: FrozenTrial, out: str | os.PathLike,
                       record: Mapping[str, Any]) -> None:
    """Close a claimed ``trial`` whose run ended before it (``record``), with the run's eval curve;
    a duplicate when another trial of the run is complete or running (:func:`superseded`)."""
    if superseded(study, trial):
        finish_trial(study, trial, END_STATES["duplicate"], {"status": "duplicate"})
        return
    _report_curve(study, trial, SweepDir(out).run(record["run_id"]).curve)
    finish_trial(study, trial, END_STATES[record["status"]], record, _objective(record))


def check_corpora(plan: SweepPlan, out: str | os.PathLike, retry_failed: bool = False) -> None:
    """A :class:`ConfigError` when a run that this sweep would resume (record ``running``, or
    ``failed`` with ``retry_failed``) was started on a corpus whose content hash has changed since:
    it would continue from its checkpoint on other data. Runs without a recorded hash, and records
    restored from the tables (their checkpoints stayed where they trained: they start afresh), are skipped."""
    resumable = ("running", "failed") if retry_failed else ("running",)
    grid_dir = plan.spec.path.resolve().parent
    hashes: dict[str, str | None] = {}
    for run in plan.runs:
        record = read_record(out, run.run_id) or {}
        old = record.get("corpus_hash")
        if not old or record.get("status") not in resumable or record.get("restored_from"):
            continue
        corpus = resolve_corpus(run.data.corpus, grid_dir)
        if corpus not in hashes:
            hashes[corpus] = _content_hash(corpus)
        new = hashes[corpus]
        if new is not None and new != old:
            raise ConfigError(f"data.corpus = {run.data.corpus!r}: its content changed since run {run.run_id} "
                              f"started in {out} (corpus hash {old[:8]} then, {new[:8]} now); restore the "
                              "original corpus files, or start a new --out folder")


def _content_hash(corpus: str) -> str | None:
    """The corpus content hash, or None when the corpus cannot be read (the run itself then fails
    with that error, recorded in its record)."""
    try:
        return corpus_content_hash(corpus)
    except (UserError, OSError):
        return None


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


def worker_loop(ctx: WorkerContext, report: Report | None = None, study: optuna.Study | None = None) -> int:
    """Claim and run trials until none of ``ctx.run_ids`` is waiting or running; ``report`` gets progress snapshots.
    With ``ctx.batch`` a claim takes a whole group (runs that differ only in
    :data:`moe_scaling.train.group.BATCHED_FIELDS`, as many as :func:`group_size` allows) and trains
    it as one program. ``study``: the queue already opened by this process (else it is opened
    from ``ctx``; opening costs ~0.4 s). Returns the number of runs this worker trained."""
    enable_compilation_cache(SweepDir(ctx.out).jax_cache)
    study = study or open_study(ctx.storage_url, ctx.study_name, ctx.grace_s)
    reporter = Progress(ctx, study, report)
    n = 0
    while True:
        recover_stale(study, ctx.grace_s)
        trials = _claim(ctx, study)
        if not trials:
            if not any(ctx.run_ids is None or t.user_attrs.get("run_id") in ctx.run_ids
                       for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))):
                break
            reporter.idle()
            time.sleep(POLL_S)
            continue
        n += _execute(ctx, study, trials, reporter)
    reporter.idle()
    return n


def _claim(ctx: WorkerContext, study: optuna.Study) -> list[FrozenTrial]:
    """The next trial, or with ``ctx.batch`` the next group of trials, claimed under this sweep
    folder's claim lock so that the local workers form whole groups."""
    if not ctx.batch:
        trial = claim_next(study, ctx.run_ids)
        return [] if trial is None else [trial]
    with _claim_lock(ctx.out):
        return claim_group(study, _group_key, partial(_group_limit, ctx.n_workers), ctx.run_ids)


@contextlib.contextmanager
def _claim_lock(out: str) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``OUT/.claim.lock`` (released on exit or process death)."""
    with exclusive_lock(SweepDir(out).claim_lock):
        yield


def _trial_run(trial: FrozenTrial) -> RunSpec | None:
    try:
        return RunSpec.from_dict(trial.user_attrs["config"])
    except (KeyError, TypeError, ValueError, UserError):
        return None          # _execute reports it as the run's failure


def _group_key(trial: FrozenTrial) -> str | None:
    run = _trial_run(trial)
    return None if run is None else batch_key(run.model, run.train, run.data)


def _group_limit(workers: int, trial: FrozenTrial) -> int:
    run = _trial_run(trial)
    return 1 if run is None else group_size(run.model, run.train, run.data, workers=workers)


@dataclass
class _Member:
    """One claimed run on its way through :func:`_execute`."""

    trial: FrozenTrial
    run: RunSpec
    rdir: Any
    data: Any
    record: dict[str, Any]
    ended: bool = False


def _open(ctx: WorkerContext, study: optuna.Study, trial: FrozenTrial) -> _Member | None:
    """Check a claimed trial and write its ``running`` record; None when there is nothing to train
    (a duplicate trial, or a run whose record already says completed/diverged: closed here)."""
    if superseded(study, trial):
        finish_trial(study, trial, END_STATES["duplicate"], {"status": "duplicate"})
        return None
    run = RunSpec.from_dict(trial.user_attrs["config"], index=trial.user_attrs.get("index", 0))
    rid = trial.user_attrs["run_id"]
    if run.run_id != rid:
        raise RuntimeError(f"trial {trial.number}: config hashes to {run.run_id}, not {rid}")
    previous = read_record(ctx.out, rid)
    if _ended_before(previous, trial):
        _close_from_record(study, trial, ctx.out, previous)
        rebuild_tables(ctx.out)
        return None
    if previous and not previous.get("restored_from"):   # resumed: its trial's curve goes on from there
        _carry_curve(study, trial)
    rdir = SweepDir(ctx.out).run(rid)
    save_config(rdir.config, run.model, run.train, run.data)
    data = dataclasses.replace(run.data, corpus=resolve_corpus(run.data.corpus, ctx.grid_dir))
    record: dict[str, Any] = {
        "run_id": rid, "sweep": ctx.study_name, "status": "running", "label": trial.user_attrs.get("label"),
        "attempts": (previous or {}).get("attempts", 0) + 1, "trial": trial.number,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "started_at": _now(), "finished_at": None,
        "config": run.to_dict(), "corpus_hash": _content_hash(data.corpus),
        "package_version": moe_scaling.__version__, "code_version": code_version()}
    write_record(ctx.out, record)
    return _Member(trial, run, rdir, data, record)


def _report_curve(study: optuna.Study, trial: FrozenTrial, curve: Path) -> None:
    """Give a trial that closes a run trained before it (e.g. a record restored from the tables)
    the run's eval losses from its ``curve`` file, unless it has some: the dashboard's curve."""
    if trial.intermediate_values or not curve.is_file():
        return
    for point in json.loads(curve.read_text()):
        loss = point.get("eval_loss")
        if loss is not None and math.isfinite(loss):
            study._storage.set_trial_intermediate_value(trial._trial_id, point["step"], loss)


def _carry_curve(study: optuna.Study, trial: FrozenTrial) -> None:
    """Give a resumed run's new trial the eval losses its earlier attempts reported, so the
    dashboard shows one whole learning curve (the evals redone after the checkpoint report the
    same values again: resume is bit-exact)."""
    rid, storage = trial.user_attrs["run_id"], study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("run_id") == rid and t.number < trial.number:
            for step, value in sorted(t.intermediate_values.items()):
                storage.set_trial_intermediate_value(trial._trial_id, step, value)


def _close(ctx: WorkerContext, study: optuna.Study, member: _Member, reporter: Progress,
           result: Any = None, error: BaseException | None = None) -> None:
    """Record a member's end (its result, or the exception that ended it) and close its trial."""
    record, rid = member.record, member.run.run_id
    if error is not None:
        atomic_write_text(member.rdir.error, "".join(traceback.format_exception(error)))
        message = " ".join(str(error).split())[:500]
        record.update(status="failed", error=f"{type(error).__name__}: {message}", finished_at=_now())
        state, value = TrialState.FAIL, None
    else:
        record.update(_result_fields(result), finished_at=_now())
        write_curve(ctx.out, rid, result.curve)
        state, value = END_STATES[record["status"]], _objective(record)
    write_record(ctx.out, record)
    rebuild_tables(ctx.out)
    finish_trial(study, member.trial, state, record, value)
    member.ended = True
    reporter.end_run(record)


def _execute(ctx: WorkerContext, study: optuna.Study, trials: list[FrozenTrial], reporter: Progress) -> int:
    """Run the claimed trials (one run, or a group trained together) to their end states; returns
    how many runs trained. One run's exception is that run's result; a group's exception is
    each unfinished member's."""
    members = [m for m in (_open(ctx, study, t) for t in trials) if m is not None]
    if not members:
        return 0
    first = members[0]
    lead = [0]      # the member whose progress is shown: the first one still training

    def show(i: int) -> None:
        m, others = members[i], sum(not o.ended for o in members) - 1
        label = m.trial.user_attrs.get("label", m.run.run_id)
        reporter.start_run(m.run.run_id, label + (f" + {others} more trained together" if others else ""))

    def on_log(i: int, entry: dict) -> None:
        if i == lead[0]:
            reporter.log(entry)
        loss = entry.get("eval_loss")
        if loss is not None and math.isfinite(loss):   # the trial's learning curve (optuna-dashboard)
            study._storage.set_trial_intermediate_value(members[i].trial._trial_id, entry["step"], loss)

    def on_end(i: int, result: Any) -> None:
        _close(ctx, study, members[i], reporter, result)
        if i == lead[0]:
            while lead[0] < len(members) and members[lead[0]].ended:
                lead[0] += 1
            if lead[0] < len(members):
                show(lead[0])

    show(0)

    with Heartbeat(study._storage, [m.trial._trial_id for m in members]):
        try:
            if len(members) == 1:
                from moe_scaling.train.loop import train

                on_end(0, train(first.run.model, first.run.train, first.data, ckpt_dir=first.rdir.ckpt,
                                progress=False, on_log=partial(on_log, 0), events_dir=first.rdir.events))
            else:
                from moe_scaling.train.group import train_group

                train_group(first.run.model, [m.run.train for m in members], first.data,
                            ckpt_dirs=[m.rdir.ckpt for m in members], on_log=on_log, on_end=on_end,
                            events_dirs=[m.rdir.events for m in members])
        except Exception as err:  # noqa: BLE001 - the runs' exception is their result, not the sweep's
            for m in members:
                if not m.ended:
                    _close(ctx, study, m, reporter, error=err)
    return len(members)


def _result_fields(result: Any) -> dict[str, Any]:
    status = result.status if result.status in ("completed", "diverged") else "failed"
    return {"status": status, "eval_loss": result.final_eval_loss, "best_eval_loss": result.best_eval_loss,
            "final_train_loss": result.final_train_loss, "tokens": result.tokens, "steps": result.steps,
            "diverged_step": result.diverged_step, "last_good_loss": result.last_good_loss,
            "wall_s": result.wall_s, "step_time_s": result.step_time_s,
            "tokens_per_s": result.tokens_per_s, "corpus_hash": result.corpus_hash,
            "metrics": dict(result.metrics or {})}


AXES = ("d_model", "n_layers", "n_experts", "top_k", "d_expert", "n_shared", "router", "lr", "seed", "tokens")


def trial_axes(run: RunSpec) -> dict[str, Any]:
    """The fields a user filters a sweep's trials by (flat user attributes, one optuna-dashboard
    column each): the usual grid axes, the derived sparsity vocabulary and the parameter counts."""
    from moe_scaling.costs import param_counts

    fields = run.model.to_dict() | run.train.to_dict()
    counts = param_counts(run.model)
    return ({k: fields[k] for k in AXES if fields.get(k) is not None}
            | {p: float(getattr(run.model, p)) for p in DERIVED_PROPERTIES}
            | {"params_active": counts.active, "params_total": counts.total})


def _objective(record: Mapping[str, Any]) -> float | None:
    """The trial value: final eval loss (train loss if no eval); None for a diverged run (PRUNED)."""
    if record["status"] != "completed":
        return None
    for key in ("eval_loss", "final_train_loss"):
        v = record.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return math.inf


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _worker_main(ctx: WorkerContext) -> None:
    """Entry point of a spawned worker process; it ends without the interpreter's teardown
    (:func:`moe_scaling.runtime.exit_now`) once its queue work is done."""
    try:
        pin_to_share(ctx.worker, ctx.n_workers)
        worker_loop(ctx)
    except KeyboardInterrupt:
        sys.exit(130)
    exit_now(0)


# --------------------------------------------------------------------------------------
# The whole sweep
# --------------------------------------------------------------------------------------


def run_sweep(grid_path: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1,
              storage: str | None = None, retry_failed: bool = False, grace_s: int = DEFAULT_GRACE_S,
              report: Report | None = None, plan: SweepPlan | None = None,
              batch: bool = True, devices_per_run: int | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate the grid, enqueue its runs and work the queue with ``workers`` local processes
    (in this process when 1) until nothing is waiting or running; ``report`` receives progress
    snapshots (see :class:`Progress`). With ``batch`` (the default) runs that differ only in seed
    or lr train together (:func:`worker_loop`); ``batch=False`` trains them one by one.
    ``devices_per_run``: each worker process sees only its own devices
    (:mod:`moe_scaling.sweep.devices`). ``log``: where the one-line notes of :func:`prepare` go.
    Returns ``{"sweep", "out", "done", "total", "unfinished",
    "failed"}`` (``failed``: the ids of runs whose last attempt raised); rerunning the same call
    after a crash finishes the sweep."""
    plan = plan or plan_sweep(grid_path)
    envs = assign_devices(workers, devices_per_run, detect_accelerators()) if devices_per_run else None
    if storage is not None:
        check_storage_url(storage)
    study, url = prepare(plan, out, storage, retry_failed=retry_failed, grace_s=grace_s, log=log)
    ctx = WorkerContext(out=str(Path(out).resolve()), storage_url=url, study_name=plan.spec.name,
                        grid_dir=str(plan.spec.path.resolve().parent), total=len(plan.runs),
                        grace_s=grace_s, n_workers=workers, batch=batch,
                        run_ids=frozenset(r.run_id for r in plan.runs),
                        run_steps={r.run_id: r.train.steps(r.data.seq_len) for r in plan.runs})
    SweepDir(out).progress.mkdir(exist_ok=True)
    clear_gone(out)
    if workers == 1 and envs is None:
        worker_loop(ctx, report, study)
    else:
        _run_processes(ctx, study, workers, report, envs)
    ids = {r.run_id for r in plan.runs}
    counts = sweep_counts(study, ids)
    rebuild_tables(out)
    return {"sweep": plan.spec.name, "out": str(out), "done": counts["done"], "total": len(ids),
            "unfinished": len(ids) - counts["done"], "failed": counts["failed"]}


def _run_processes(ctx: WorkerContext, study: optuna.Study, workers: int, report: Report | None,
                   envs: list[dict[str, str]] | None = None) -> None:
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_worker_main, args=(dataclasses.replace(ctx, worker=i),),
                        name=f"moe-sweep-worker-{i}") for i in range(workers)]
    for i, p in enumerate(procs):
        with worker_env(envs[i] if envs else {}):  # a spawned worker's JAX sees only its devices
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
