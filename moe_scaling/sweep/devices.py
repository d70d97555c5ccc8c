"""Which devices each local sweep worker may use (``moe-sweep run --workers N --devices-per-run K``).

JAX preallocates most of every GPU it can see, so two workers that see the same GPU fight over
its memory. Each worker process therefore gets its own ``K`` devices through the environment
variable the runtime reads before JAX starts (:func:`assign_devices`), set in the parent just
before the worker is spawned (:func:`worker_env`):

* NVIDIA GPUs: ``CUDA_VISIBLE_DEVICES`` (the visible ones are the parent's
  ``CUDA_VISIBLE_DEVICES`` if set, else the ``nvidia-smi -L`` list);
* AMD GPUs: ``HIP_VISIBLE_DEVICES`` (from the parent's, or ``rocm-smi``);
* no accelerator: CPU workers get ``K`` XLA host devices
  (``--xla_force_host_platform_device_count=K``) when ``K > 1``, and nothing otherwise.

Worker ``i`` gets devices ``[i K, (i + 1) K)`` of the visible list, so no two workers share one;
more workers than that is a one-line error. TPUs are not assigned (one process per host owns
them).

CPU cores are shared out the same way (:func:`cpu_share`, applied by each spawned worker to itself
with :func:`pin_to_share`): worker ``i`` of ``N`` runs on the ``i``-th of ``N`` contiguous slices of
the cores the parent may use. XLA:CPU's thread pool otherwise spreads every worker over every core,
and two workers' threads contend: on the 2-core machine two study-sized train steps (d24 / d32, 2
layers) ran 8-20% faster each when pinned one per core (bench/README.md, "sweep workers").
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterator, Mapping

from moe_scaling.errors import InputError

__all__ = ["Accelerators", "detect_accelerators", "assign_devices", "worker_env", "cpu_share", "pin_to_share"]

_VARS = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class Accelerators:
    kind: str                  # "cuda", "rocm" or "cpu"
    ids: tuple[str, ...]       # the visible device ids (empty for cpu)


def _listed(var: str, env: Mapping[str, str]) -> tuple[str, ...] | None:
    value = env.get(var)
    if value is None:
        return None
    return tuple(x.strip() for x in value.split(",") if x.strip())


def _smi(cmd: list[str], pattern: str) -> tuple[str, ...]:
    if shutil.which(cmd[0]) is None:
        return ()
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(m for m in re.findall(pattern, text, flags=re.M))


def detect_accelerators(env: Mapping[str, str] | None = None) -> Accelerators:
    """The accelerators this machine shows local workers, without starting JAX."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return Accelerators("cpu", ())
    for kind, var in _VARS.items():
        ids = _listed(var, env)
        if ids:
            return Accelerators(kind, ids)
    gpus = _smi(["nvidia-smi", "-L"], r"^GPU (\d+):")
    if gpus:
        return Accelerators("cuda", gpus)
    amd = _smi(["rocm-smi", "--showid"], r"^GPU\[(\d+)\]")
    if amd:
        return Accelerators("rocm", tuple(dict.fromkeys(amd)))
    return Accelerators("cpu", ())


def assign_devices(workers: int, devices_per_run: int, acc: Accelerators,
                   base_env: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The environment variables of each of ``workers`` workers (one dict per worker)."""
    if devices_per_run < 1:
        raise InputError(f"--devices-per-run = {devices_per_run}: must be >= 1")
    if acc.kind == "cpu":
        if devices_per_run == 1:
            return [{} for _ in range(workers)]
        flags = (base_env or os.environ).get("XLA_FLAGS", "")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
        value = f"{flags} --xla_force_host_platform_device_count={devices_per_run}".strip()
        return [{"XLA_FLAGS": value} for _ in range(workers)]
    need = workers * devices_per_run
    if need > len(acc.ids):
        raise InputError(f"--workers {workers} x --devices-per-run {devices_per_run} = {need} {acc.kind} devices, "
                         f"{len(acc.ids)} visible ({','.join(acc.ids)}); lower --workers or --devices-per-run")
    var = _VARS[acc.kind]
    return [{var: ",".join(acc.ids[i * devices_per_run:(i + 1) * devices_per_run])} for i in range(workers)]


@contextlib.contextmanager
def worker_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in this process's environment for the duration (a spawned worker inherits
    them), then restore the previous values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_share(worker: int, workers: int, cpus: list[int]) -> set[int]:
    """The cores of ``worker`` (0-based) among ``workers``: the ``worker``-th of ``workers``
    contiguous, near-equal slices of ``cpus`` (sorted); with more workers than cores, worker ``i``
    gets core ``i mod len(cpus)``."""
    cpus = sorted(cpus)
    if not cpus or workers < 1 or not 0 <= worker < workers:
        raise InputError(f"worker {worker} of {workers} on cores {cpus}: need 0 <= worker < workers and a core")
    if workers >= len(cpus):
        return {cpus[worker % len(cpus)]}
    lo, hi = worker * len(cpus) // workers, (worker + 1) * len(cpus) // workers
    return set(cpus[lo:hi])


def pin_to_share(worker: int, workers: int) -> set[int] | None:
    """Restrict this process to :func:`cpu_share` of the cores it may use now (Linux; before JAX starts
    its thread pool). Returns the cores, or None where the platform cannot pin or one worker runs."""
    if workers < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    share = cpu_share(worker, workers, sorted(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, share)
    return share
