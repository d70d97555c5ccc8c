"""Process-level settings: the allocator (:func:`keep_freed_memory`), JAX's persistent compilation
cache (:func:`enable_compilation_cache`), the end of a process (:func:`exit_now`) and the machine a
measurement ran on (:func:`machine_info`).

Keep freed memory in the process so that every XLA:CPU step does not page-fault its buffers in.

XLA:CPU allocates each execution's temporary buffers (382 MB for the benchmark's d256 dense
train step) with ``malloc`` from its worker threads and frees them at the end of the step. glibc
serves a block that large with a fresh ``mmap`` and returns it with ``munmap`` on ``free``, so
every step touches hundreds of megabytes of new pages: ~100,000 minor page faults per dense step
and ~185,000 per fine-grained MoE step, measured on the project's 2-core machine, where they
took 25-30% of the step time (bench/README.md, "moe overhead").

:func:`keep_freed_memory` asks glibc (``mallopt``) to serve every thread from the main heap
(``M_ARENA_MAX = 1``), never to ``mmap`` a block (``M_MMAP_MAX = 0``) and never to give freed
heap memory back (``M_TRIM_THRESHOLD`` 2 GiB): the step's buffers are then reused in place, with
no page faults after the first step. The price is that the process keeps its high-water mark of
memory until it exits, which suits a training process. Worker threads that already allocated
keep their own arenas, so it must run before JAX starts its CPU backend: ``import moe_scaling``
calls it. Set ``MOE_SCALING_MALLOC=system`` to leave the allocator alone. Nothing happens
outside Linux/glibc, or when the user already set ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_MAX_``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

from moe_scaling.files import exclusive_lock

__all__ = ["keep_freed_memory", "enable_compilation_cache", "default_cache_dir", "exit_now", "machine_info",
           "timing_lock"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the glibc settings of the module docstring once per process; returns whether they
    are in effect (``False`` when disabled, not glibc, or the user tuned ``malloc`` already)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOE_SCALING_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                           "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt semantics to rely on)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
    return _applied


def default_cache_dir() -> Path | None:
    """The user-level compilation cache: ``$MOE_SCALING_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/moe-scaling/jax`` (``~/.cache/...``); None when the variable is set empty."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-scaling" / "jax"
    path = os.environ.get("MOE_SCALING_JAX_CACHE", str(default))
    return Path(path) if path else None


def enable_compilation_cache(path: str | os.PathLike | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (None: leave it off) and cache every program.

    XLA's own GPU caches are left off: they put the cache folder's path into the compile options
    and so into every cache key, and a cache copied or moved to another folder would never hit.
    """
    if path is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(path).resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown.

    Tearing down a process that trained (freeing JAX's backend, compiled programs and caches,
    orbax's and optuna's modules, object by object) took 1.0-1.2 s after a quickstart sweep on the
    project's 2-core machine, a sixth of the sweep's whole time outside training; ``os._exit``
    skips it. Only for the end of a command whose work is closed: every file it writes is
    written atomically and closed, checkpoint managers are closed (they wait for their last
    save), queue transactions are committed. This flushes stdout/stderr and waits for JAX's
    pending side effects first. Not for processes in a ``jax.distributed`` job, whose shutdown
    is a barrier the other processes wait on."""
    if "jax" in sys.modules:
        sys.modules["jax"].effects_barrier()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to lose
            pass
    os._exit(code)


# The x86 instruction-set extensions that change what XLA:CPU and ONNX Runtime compute with (and so
# their speed, and the last bits of their sums): vector width, and native bf16 / int8 dot products.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8", "avx_vnni")


def machine_info() -> dict:
    """What a benchmark figure was measured on, recorded beside it: CPU model, core count, the
    instruction-set extensions that matter for this project's kernels (``isa``: ``"avx512"``,
    ``"avx2"`` or the architecture; ``bf16``: native bf16 dot products, ``avx512_bf16`` or
    ``amx_bf16``; ``flags``: the ones present of ``_ISA_FLAGS``), XLA's ISA cap when
    ``XLA_FLAGS`` sets ``--xla_cpu_max_isa`` (it then computes as the capped ISA), the 1-minute load
    average (a busy shared machine slows every timing), platform, Python and the date. Linux reads
    ``/proc/cpuinfo``; elsewhere the CPU fields are ``None``."""
    model, flags = None, set()
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    present = [f for f in _ISA_FLAGS if f in flags]
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else (platform.machine() or None)
    cap = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return {"cpu": model, "cpus": os.cpu_count(), "isa": isa,
            "bf16": bool({"avx512_bf16", "amx_bf16"} & flags), "flags": present,
            "xla_max_isa": cap.group(1) if cap else None,
            "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


TIMING_LOCK = "/tmp/moe-timing.lock"


@contextmanager
def timing_lock(path: str = TIMING_LOCK) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` while timing: the benchmarks take it, so two of
    them never time at once on a shared machine (other work must still be kept off by hand)."""
    with exclusive_lock(path):
        yield
