"""Is a worker process still alive? Read from ``/proc`` on Linux.

Two callers ask it. The queue (:func:`moe_scaling.sweep.queue.recover_stale`) re-enqueues a trial
whose worker on this machine has gone; ``moe-sweep status`` (:func:`moe_scaling.sweep.results.summarize`)
shows a run whose record still says ``running`` but whose worker has gone as ``interrupted``, so that
after a crash it does not count dead runs as running.

A process id alone does not name a process: ids are reused, on a rebooted machine or a fresh one with
the same host name. So a process is compared with what is known of the worker: the queue stores its
start time in clock ticks (:func:`proc_start`); a run record stores only ``host:pid`` and the run's
start, and a process that started after the run did cannot be its worker (:func:`record_worker_gone`).
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from pathlib import Path

__all__ = ["proc_start", "started_at_epoch", "record_worker_gone"]

_SLACK_S = 2.0
"""Rounding allowed between a process's start (whole seconds after boot, ``btime``) and a record's
``started_at`` (whole seconds)."""


def proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, field 22 of ``/proc/PID/stat``) or None
    when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()       # the command name may hold spaces and parentheses
    return None if rest[0] in ("Z", "X") else rest[19]


def started_at_epoch(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (boot time ``btime`` from
    ``/proc/stat`` plus its start ticks / ``SC_CLK_TCK``); None when it is gone or unreadable."""
    ticks = proc_start(pid)
    if ticks is None:
        return None
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return btime + int(ticks) / os.sysconf("SC_CLK_TCK")


def record_worker_gone(worker: str | None, started_at: str | None) -> bool:
    """True when a run record's worker (``host:pid``) ran on this machine and is gone: no process
    has that id, or the one that has it started after the run did (a reused id). False when it may
    be alive, ran on another host, or the record does not say (another machine must judge it)."""
    if not worker or not started_at or ":" not in worker or not Path("/proc").is_dir():
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        run_start = datetime.fromisoformat(started_at).timestamp()
    except ValueError:
        return False
    began = started_at_epoch(int(pid))
    return began is None or began > run_start + _SLACK_S
