"""moe_scaling.runtime: importing the package stops XLA:CPU from page-faulting its step buffers."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import moe_scaling
from moe_scaling.runtime import keep_freed_memory
import jax, jax.numpy as jnp

# a temporary of 4096 x 4096 float32 (64 MiB) per call, freed when the call returns
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
x = jnp.ones((4096, 64), jnp.float32)
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": keep_freed_memory(), "faults_per_call": faults}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.update(JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_import_keeps_freed_memory_so_steps_do_not_page_fault():
    tuned = _probe()
    system = _probe(MOE_SCALING_MALLOC="system")
    assert tuned["applied"] is True and system["applied"] is False
    # 64 MiB of fresh pages is ~16,000 faults per call with glibc's defaults (mmap + munmap)
    assert system["faults_per_call"] > 8000
    # tuned: buffers reused, so faults only where the heap grows (~0 per call); 5% of the system
    # allocator's count is a count of pages, not a timing, and the same on any x86-64 CPU
    assert tuned["faults_per_call"] < 0.05 * system["faults_per_call"]


def test_user_malloc_settings_are_respected():
    assert _probe(MALLOC_ARENA_MAX="4")["applied"] is False


def test_exit_now_keeps_buffered_output_and_the_exit_code(tmp_path):
    """exit_now skips the interpreter's teardown but not what the command printed or wrote."""
    script = (
        "import sys, jax.numpy as jnp\n"
        "from moe_scaling.runtime import exit_now\n"
        f"open({str(tmp_path / 'f.txt')!r}, 'w').write('closed before the exit')\n"
        "print('to stdout', float(jnp.ones(3).sum()), end='')\n"
        "print('to stderr', end='', file=sys.stderr)\n"
        "exit_now(3)\n"
        "print('never')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=os.environ | {"JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "to stdout 3.0" and proc.stderr.endswith("to stderr")
    assert (tmp_path / "f.txt").read_text() == "closed before the exit"
