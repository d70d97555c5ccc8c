"""Is a worker process still alive? Read from ``/proc`` on Linux.

Three callers ask it. The queue (:func:`moe_scaling.sweep.queue.recover_stale`) re-enqueues a trial
whose worker on this machine has gone; ``moe-sweep status`` (:func:`moe_scaling.sweep.results.summarize`)
shows a run whose record still says ``running`` but whose worker has gone as ``interrupted``, so that
after a crash it does not count dead runs as running; the progress line
(:mod:`moe_scaling.sweep.progress`) drops the progress files of workers that have gone.

A process id alone does not name a process: ids are reused, on a rebooted machine or a fresh one with
the same host name. So a process is compared with what is known of the worker: the queue and the
progress files store its start time in clock ticks (:func:`identity`, judged by :func:`process_gone`);
a run record stores only ``host:pid`` and the run's start, and a process that started after the run
did cannot be its worker (:func:`record_worker_gone`).
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

__all__ = ["proc_start", "started_at_epoch", "host_id", "identity", "process_gone", "record_worker_gone"]

_HOST_ID: str | None = None

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


def host_id() -> str:
    """This machine: host name plus the kernel boot id (tells containers with one host name, and a
    machine before and after a reboot, apart)."""
    global _HOST_ID
    if _HOST_ID is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        _HOST_ID = f"{socket.gethostname()}/{boot}"
    return _HOST_ID


def identity() -> dict[str, Any]:
    """This process as a worker: ``{"host": host_id(), "pid", "start"}`` (``start``: :func:`proc_start`)."""
    return {"host": host_id(), "pid": os.getpid(), "start": proc_start(os.getpid())}


def process_gone(who: Mapping[str, Any]) -> bool:
    """True when the worker ``who`` (an :func:`identity`) ran on this machine and its process is gone
    or its id now names another process (a different start). False when it is alive or ran on
    another machine (whose liveness only that machine, or a heartbeat, can tell)."""
    if who.get("host") != host_id() or not Path("/proc").is_dir():
        return False
    return proc_start(who["pid"]) != who.get("start")


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
