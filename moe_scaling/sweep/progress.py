"""Live progress of a sweep: each worker's state in its own file under ``DIR/progress/``
(:class:`Progress`, named by :meth:`SweepDir.progress_file`) and the progress line's numbers
(:func:`snapshot`, :func:`read_snapshot`). A file names its worker (host, pid, start), so a reader
drops the files of workers on this machine that have gone (:func:`clear_gone`, :func:`read_snapshot`)
and keeps those of live workers, of this ``moe-sweep run`` or another on the same folder."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

import optuna

from moe_scaling.files import write_json
from moe_scaling.sweep.layout import SweepDir
from moe_scaling.sweep.liveness import identity, process_gone
from moe_scaling.sweep.queue import WorkerContext, sweep_counts

__all__ = ["Report", "Progress", "snapshot", "read_snapshot", "clear_gone"]


Report = Callable[[dict], None]


WRITE_EVERY_S = 1.0    # a worker's progress file is rewritten at most this often between starts and ends


class Progress:
    """Live progress of one worker: its state (run, step, loss, tokens/s) goes to
    its own file (``{"worker": identity(), **state}``) when a run starts or ends and at most every
    :data:`WRITE_EVERY_S` seconds on logs (an atomic write per log line was 1.3 ms, 0.26 s of a
    200-step run), and, in a single-worker sweep, to ``report`` as a :func:`snapshot`
    on every log (with ``"event"``: ``"start"`` when a run starts, the run's record when it ends)."""

    def __init__(self, ctx: WorkerContext, study: optuna.Study, report: Report | None = None) -> None:
        self.ctx, self.study, self.report = ctx, study, report
        self.who = identity()
        self.path = SweepDir(ctx.out).progress_file(self.who)
        self.state: dict[str, Any] = {}
        self._counts: dict[str, Any] | None = None
        self._written = float("-inf")

    def _write(self, event: Any = None, throttle: bool = False) -> None:
        now = time.monotonic()
        if not throttle or now - self._written >= WRITE_EVERY_S:
            write_json(self.path, {"worker": self.who, **self.state})
            self._written = now
        if self.report is not None:
            if self._counts is None:
                self._counts = sweep_counts(self.study, self.ctx.run_ids)
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
        self._write(throttle=True)

    def end_run(self, record: Mapping[str, Any]) -> None:
        """A run ended; the state shown is cleared when it was this run's (a member of a group
        that ends before the member shown leaves it in place)."""
        self._counts = None
        if self.state.get("run_id") == record.get("run_id"):
            self.state = {}
        self._write(dict(record))

    def idle(self) -> None:
        self.state = {}
        write_json(self.path, {"worker": self.who})


def snapshot(ctx: WorkerContext, counts: Mapping[str, Any], states: list[Mapping[str, Any]]) -> dict:
    """What a progress line shows: ``total`` runs, ``done``, the ``states`` of the runs in flight
    (run_id, step, steps, loss, tokens_per_s), ``n_workers`` and ``eta_s`` (None until it can be
    estimated, over the workers). With ``ctx.run_steps`` (each run's optimizer steps) the ETA is the
    steps left times the finished runs' wall time per step (runs of one sweep differ in steps by 100x:
    the layout study's 513 to 46,647); otherwise the mean wall time of finished runs, else the
    in-flight runs' pace, times the runs left."""
    now = time.time()
    live = [s for s in states if s.get("run_id")]
    workers = max(ctx.n_workers, len(live), 1)
    fractions = [(min((s.get("step") or 0) / s["steps"], 1.0), now - s.get("started", now))
                 for s in live if s.get("steps")]
    walls = counts["walls"]
    steps = ctx.run_steps or {}
    timed = [rid for rid in walls if steps.get(rid)]
    if timed:
        per_step = sum(walls[rid] for rid in timed) / sum(steps[rid] for rid in timed)
        done = counts["done_ids"]
        left = sum(n for rid, n in steps.items() if rid not in done) \
            - sum(min(s.get("step") or 0, s["steps"]) for s in live if s.get("steps"))
        eta = max(left, 0) * per_step / workers
    else:
        per_run = sum(walls.values()) / len(walls) if walls else None
        if per_run is None:
            rates = [elapsed / f for f, elapsed in fractions if f > 0.05]
            per_run = sum(rates) / len(rates) if rates else None
        remaining = max(ctx.total - counts["done"] - sum(f for f, _ in fractions), 0.0)
        eta = None if per_run is None else remaining * per_run / workers
    return {"total": ctx.total, "done": counts["done"], "states": live, "n_workers": workers,
            "eta_s": eta}


def _read(path) -> dict | None:
    """A progress file's content; None when it cannot be read or names no worker (a file of an
    older release, one per worker number)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("worker"), dict) else None


def clear_gone(out) -> None:
    """Delete the progress files under sweep folder ``out`` whose worker ran on this machine and has
    gone, or that name no worker; a live worker's file stays (another command may be working the
    folder), as does one from another machine, which only that machine can judge."""
    for path in SweepDir(out).progress.glob("*.json"):
        state = _read(path)
        if state is None or process_gone(state["worker"]):
            path.unlink(missing_ok=True)


def read_snapshot(ctx: WorkerContext, study: optuna.Study) -> dict:
    """A :func:`snapshot` from the progress files of the folder's live workers and the storage."""
    states = []
    for path in sorted(SweepDir(ctx.out).progress.glob("*.json")):
        state = _read(path)          # None also for a file deleted between glob and read
        if state is not None and not process_gone(state.pop("worker")):
            states.append(state)
    return snapshot(ctx, sweep_counts(study, ctx.run_ids), states) | {"event": None}
