"""Sharding over a device mesh: data / fsdp / expert parallel steps equal the single-device step,
a checkpoint written on one mesh resumes on another, two processes (jax.distributed, gloo) equal
one process with the same devices, and the token-local MoE dispatch drops exactly the tokens that
the single-device capacity dispatch drops when run on each device's tokens alone.

Each multi-device scenario runs in its own Python process: XLA's host device count is fixed when
JAX starts. One process checks every single-process mesh (compilation is most of the time).

Tolerance ``TOL = 1e-5`` on losses after 5 AdamW steps: the mesh computes the same float32 sums in
another order (each device sums its 64 of the 256 tokens, then the devices' partials are added;
the all-to-all moves rows but the same rows meet the same expert weights). Reassociating a sum of
``n`` float32 terms changes it by about ``sqrt(n) * 2**-24 * sum|x|`` (random rounding): with
n = 256 token losses of ~5.5 that is ~5e-6 per mean, and the 5 steps feed each other. Measured:
at most 5e-7. The MoE layers see capacity factor ``E / k = 2``, at which the per-device capacity
``C_l`` equals the device's 64 tokens and the global one the batch's 256: nothing can drop in
either, so the mesh must give the single-device function.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import F32_TOL, REPO, SHARED_DATA
from moe_scaling.config import MeshShape, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.train.mesh import check_mesh, param_spec

# A mesh step is the single-device step with its sums split over devices: float32 round-off of losses
# of ~5 (conftest.F32_TOL; README: within 5e-7 over 5 steps).
TOL = F32_TOL

SETUP = f"""
import faulthandler, json, os, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)   # _two_processes asks a hung process for its stacks
import moe_scaling
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.train.loop import train

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    n_experts=4, top_k=2, n_shared=1, router="sigmoid", router_bias=True, max_seq_len=32)
TRAIN = TrainConfig(tokens=5 * 8 * 32, batch_size=8, lr=3e-3, warmup=1, log_every=1, eval_every=5,
                    eval_batches=1, ckpt_every=100, seed=0, dispatch="capacity", capacity_factor=2.0)
DATA = DataConfig(corpus={str(SHARED_DATA / "text" / "tinyshakespeare" / "input.txt")!r}, seq_len=32,
                  max_tokens=60_000)

def losses(r):
    return [row["train_loss"] for row in r.curve[1:]] + [r.final_eval_loss]
"""

SINGLE = SETUP + """
from moe_scaling.runtime import enable_compilation_cache
enable_compilation_cache(sys.argv[2])   # the resumed run's step is the data=2,expert=2 step again
out = {}
for mesh in (None, "data=2,expert=2", "expert=4", "fsdp=2,expert=2", "fsdp=4"):
    out[str(mesh)] = losses(train(MODEL, TRAIN, DATA, progress=False, mesh=mesh))
ckpt = sys.argv[1]
first = train(MODEL, TRAIN, DATA, progress=False, mesh="data=4", ckpt_dir=ckpt, stop_at_step=2)
assert first.status == "stopped", first.status
out["resumed"] = losses(train(MODEL, TRAIN, DATA, progress=False, mesh="data=2,expert=2", ckpt_dir=ckpt))
print("RESULT " + json.dumps(out))
"""

WORKER = SETUP + """
from moe_scaling.train.mesh import initialize_distributed
initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
print("RESULT " + json.dumps(losses(train(MODEL, TRAIN, DATA, progress=False, mesh="expert=4"))))
"""

RESUMING_WORKER = SETUP + """
import dataclasses
from moe_scaling.train.mesh import initialize_distributed
initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
ckpt, stop = sys.argv[3], (int(sys.argv[4]) or None)
if len(sys.argv) > 5 and int(sys.argv[2]) == 1:   # process 1 alone cannot read checkpoint step argv[5]'s state
    import orbax.checkpoint as ocp
    _restore = ocp.StandardCheckpointHandler.restore
    def restore(self, directory, *args, **kwargs):
        if directory.parent.name == sys.argv[5]:
            raise OSError(f"{directory}: process 1 cannot read its part")
        return _restore(self, directory, *args, **kwargs)
    ocp.StandardCheckpointHandler.restore = restore
r = train(MODEL, dataclasses.replace(TRAIN, ckpt_every=1), DATA, progress=False, mesh="expert=4", ckpt_dir=ckpt,
          stop_at_step=stop)
print("RESULT " + json.dumps({"status": r.status, "losses": losses(r)}))
"""

INIT_FROM_WORKER = SETUP + """
from moe_scaling.errors import ConfigError
from moe_scaling.train.mesh import initialize_distributed
initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
if int(sys.argv[2]) == 1:   # process 1 alone cannot read the model both start from
    import orbax.checkpoint as ocp
    def restore(self, directory, *args, **kwargs):
        raise OSError(f"{directory}: process 1 cannot read its part")
    ocp.PyTreeCheckpointHandler.restore = restore
try:
    train(MODEL, TRAIN, DATA, progress=False, mesh="expert=4", init_from=sys.argv[3])
except ConfigError as err:
    print("ERROR " + str(err), flush=True)
    sys.exit(3)
print("RESULT trained")
"""

TOKEN_LOCAL = SETUP + """
import jax, jax.numpy as jnp, numpy as np
from moe_scaling.config import MeshShape
from moe_scaling.model.routing import moe_experts, moe_experts_sharded, route, route_sharded
from moe_scaling.train.mesh import make_mesh
from moe_scaling.train.plan import step_flops

# 1. Drops. 256 tokens on data=2,expert=2 (64 per device), 8 experts top-2, capacity factor 1: each
# device gives an expert 16 slots, one device would give it 64. Expert 0 is favoured by the first
# quarter of the batch (device 0) only, so device 0 drops where one device would not.
T, D, F, E, K, CF = 256, 16, 24, 8, 2, 1.0
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
logits = jnp.asarray(rng.normal(size=(T, E)) + 3.0 * (np.arange(T) < T // 4)[:, None] * (np.arange(E) == 0), jnp.float32)
w_gu = jnp.asarray(rng.normal(size=(E, D, 2 * F)) / 4, jnp.float32)
w_dn = jnp.asarray(rng.normal(size=(E, F, D)) / 5, jnp.float32)
g = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
mesh = make_mesh(MeshShape.parse("data=2,expert=2"))

def on_mesh(x, logits, w_gu, w_dn):
    return moe_experts_sharded(x, route(logits, K), w_gu, w_dn, mesh=mesh, capacity_factor=CF)

def per_device(x, logits, w_gu, w_dn):   # the reference: one device's capacity dispatch per group of 64
    parts = [moe_experts(x[i:i + T // 4], route(logits[i:i + T // 4], K), w_gu, w_dn, method="capacity",
                         capacity_factor=CF) for i in range(0, T, T // 4)]
    return jnp.concatenate([y for y, _ in parts]), sum(dr for _, dr in parts) / 4

def one_device(x, logits, w_gu, w_dn):
    return moe_experts(x, route(logits, K), w_gu, w_dn, method="capacity", capacity_factor=CF)

out = {}
for name, fn in [("mesh", on_mesh), ("per_device", per_device), ("one_device", one_device)]:
    (y, dropped), vjp = jax.vjp(jax.jit(fn), x, logits, w_gu, w_dn)
    grads = vjp((g, jnp.zeros(())))
    out[name] = {"y": np.asarray(y).tolist(), "dropped": float(dropped),
                 "grads": [np.asarray(a).ravel().tolist() for a in grads]}

# 2. Routing on the mesh: each device's top_k over its own rows is route() on the whole batch.
bias = jnp.asarray(rng.normal(size=(E,)) * 0.1, jnp.float32)
for kind, b in [("softmax", None), ("sigmoid", bias)]:
    sharded = jax.jit(lambda lg, b: route_sharded(lg, K, mesh=mesh, kind=kind, bias=b))(logits, b)
    out["route_" + kind] = all(np.array_equal(np.asarray(u), np.asarray(v))
                               for u, v in zip(sharded, route(logits, K, kind=kind, bias=b)))

# 3. FLOPs per device of the whole train step (XLA's cost analysis), data=4 against one device.
flops = {str(m): step_flops(MODEL, TrainConfig(batch_size=8, tokens=8 * 32 * 5, dispatch="capacity", mesh=m), 32)
         for m in (None, "data=4")}
out["flops"] = flops
print("RESULT " + json.dumps(out))
"""


def _env(devices: int) -> dict:
    # Unoptimised XLA:CPU code halves the compile time that dominates these tiny runs; every run
    # compared in one test is compiled the same way. The caller's XLA_FLAGS (e.g. the suite's
    # --xla_cpu_max_isa=AVX2 run) come first, so they reach the subprocesses too.
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true".strip())
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _result(proc_out: str):
    lines = [l for l in proc_out.splitlines() if l.startswith("RESULT ")]
    assert lines, proc_out[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Every single-process mesh on 4 host devices, in one process."""
    ckpt, cache = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("jax_cache")
    p = subprocess.run([sys.executable, "-c", SINGLE, str(ckpt), str(cache)], env=_env(4), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return _result(p.stdout)


def test_meshes_equal_one_device(single_process):
    ref = single_process["None"]
    assert len(ref) == 6 and all(np.isfinite(ref))
    for mesh in ("data=2,expert=2", "expert=4", "fsdp=2,expert=2", "fsdp=4"):
        assert _max_diff(single_process[mesh], ref) <= TOL, (mesh, single_process[mesh], ref)


def test_checkpoint_moves_between_meshes(single_process):
    """Saved at step 2 on data=4, restored on data=2,expert=2 and trained to the end: the losses
    of an uninterrupted run (on one device)."""
    assert _max_diff(single_process["resumed"], single_process["None"]) <= TOL


def test_two_processes_equal_one(single_process):
    """2 processes x 2 CPU devices (jax.distributed, gloo collectives; the MoE rows cross processes
    in the all-to-all over `expert`) = 1 process on 1 device."""
    outs = []
    for p in _two_processes(lambda addr, i: [sys.executable, "-c", WORKER, addr, str(i)]):
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(_result(p.stdout))
    assert outs[0] == outs[1]                           # every process sees the same losses
    assert _max_diff(outs[0], single_process["None"]) <= TOL


def test_two_processes_resume_past_a_checkpoint_one_of_them_cannot_read(tmp_path, single_process):
    """2 processes checkpoint every step and stop at step 3. Then, (a) process 1's data files of that
    checkpoint are deleted (both processes' reads fail: process 0's needs them too), or (b) the
    files stay and only process 1's read raises (a file only it reads is bad: process 0 reads step
    3 fine). Resumed, the processes agree the checkpoint is damaged, process 0 sets it aside while
    the other waits, and both continue from step 2 to the losses of an uninterrupted run (on one
    device, within float32 round-off).
    (Before: in (a) process 1 reloaded the checkpoint list while process 0 was moving the folder,
    died, and process 0 hung in its next collective; in (b) process 0 waited for ever in the
    collective that ends orbax's manager restore while process 1 waited to agree.)
    (c) A run that starts from that model (``init_from``: a recipe's next stage) where only process 1
    cannot read it: both stop with a one-line ConfigError, neither waits for the other. (Before:
    process 1 died and process 0 went on to wait in the first collective of its training.)"""
    ckpt = tmp_path / "ckpt"

    def run(where, stop: int, *fail_on_1: str) -> list[tuple[dict, str]]:
        procs = _two_processes(lambda addr, i: [sys.executable, "-c", RESUMING_WORKER, addr, str(i), str(where),
                                                str(stop), *fail_on_1], timeout=240)
        for p in procs:
            assert p.returncode == 0, p.stderr[-3000:]
        return [(_result(p.stdout), p.stderr) for p in procs]

    first = run(ckpt, 3)
    assert [r["status"] for r, _ in first] == ["stopped", "stopped"]
    intact = tmp_path / "intact"
    shutil.copytree(ckpt, intact)
    shards = list((ckpt / "3" / "state").glob("ocdbt.process_1/d/*"))
    assert shards
    for f in shards:
        f.unlink()
    for where, fail_on_1, process_0_says in ((ckpt, (), "Exception"),
                                            (intact, ("3",), "another process could not read its part")):
        resumed = run(where, 0, *fail_on_1)
        assert [r["status"] for r, _ in resumed] == ["completed", "completed"]
        assert resumed[0][0]["losses"] == resumed[1][0]["losses"]
        assert f"checkpoint step 3 in {where} does not restore ({process_0_says}" in resumed[0][1]
        assert (where / "damaged" / "3").is_dir() and not (where / "3").exists()
        assert len(resumed[0][0]["losses"]) == len(single_process["None"])
        assert _max_diff(resumed[0][0]["losses"], single_process["None"]) <= TOL
    procs = _two_processes(lambda addr, i: [sys.executable, "-c", INIT_FROM_WORKER, addr, str(i), str(intact)],
                           timeout=240)
    assert [p.returncode for p in procs] == [3, 3], [p.stderr[-3000:] for p in procs]
    assert "could not be read into this run's model (another process could not read its part)" in procs[0].stdout
    assert "model (OSError: " in procs[1].stdout and "process 1 cannot read its part" in procs[1].stdout


def _two_processes(args_of, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run ``args_of(addr, i)`` for processes 0 and 1 (2 CPU devices each, one coordinator);
    every process's returncode, stdout and stderr, after at most ``timeout`` s for both.

    Their output goes to files, not pipes: with pipes read one process at a time, process 1
    blocked writing once its pipe held 64 KiB (a failed orbax read prints a page per array), never
    reached the next barrier, and process 0 waited there until the timeout (the rare CI hang)."""
    addr = f"127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/{i}.out", "w+"), open(f"{logs}/{i}.err", "w+")) for i in range(2)]
        procs, deadline, timed_out = [], time.monotonic() + timeout, False
        try:
            for i, (out, err) in enumerate(files):
                procs.append(subprocess.Popen(args_of(addr, i), env=_env(2), stdout=out, stderr=err))
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:              # workers that registered faulthandler print every thread's stack
                if q.poll() is None:
                    q.send_signal(signal.SIGUSR1)
            time.sleep(5)
        finally:                         # none outlives the test, also when a start fails
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
        texts = [(_read_back(out), _read_back(err)) for out, err in files]
    if timed_out:
        pytest.fail(f"the 2 processes did not finish in {timeout:g} s\n" + "\n".join(
            f"process {i} (returncode {p.returncode}) stderr:\n{_stacks_and_tail(err)}"
            for i, (p, (_, err)) in enumerate(zip(procs, texts))))
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, texts)]


def _read_back(f) -> str:
    """All of the open text file ``f``, which is then closed."""
    with f:
        f.seek(0)
        return f.read()


def _stacks_and_tail(err: str) -> str:
    """The stacks faulthandler printed into ``err`` (from its first ``Thread 0x`` or ``Current
    thread`` line), then the end of ``err``: a failed orbax read can print pages after them."""
    at = min((i for i in (err.find("Thread 0x"), err.find("Current thread 0x")) if i >= 0), default=len(err))
    return err[at:at + 8000] + "\n[...]\n" + err[-3000:]


def test_two_process_json_stdout_is_one_json_object(tmp_path):
    """`moe-train --json` in 2 processes: gloo's "[Gloo] Rank ... connected" lines go to stderr,
    process 0's stdout parses as one JSON object and process 1's is empty."""
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps({
        "model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64,
                  "n_experts": 4, "top_k": 2, "max_seq_len": 32},
        "train": {"tokens": 2 * 8 * 32, "batch_size": 8, "eval_batches": 1},
        "data": {"corpus": str(SHARED_DATA / "text" / "tinyshakespeare" / "input.txt"), "seq_len": 32,
                 "max_tokens": 60_000}}))
    procs = _two_processes(lambda addr, i: [
        sys.executable, "-m", "moe_scaling.cli.train", str(run), "--out", str(tmp_path / "out"), "--mesh", "data=4",
        "--coordinator", addr, "--num-processes", "2", "--process-id", str(i), "--json"])
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    assert "[Gloo] Rank" in procs[0].stderr                      # the chatter exists, on stderr
    summary = json.loads(procs[0].stdout)
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["stages"][0]["status"] == "completed"
    assert procs[1].stdout == ""


@pytest.fixture(scope="module")
def token_local():
    p = subprocess.run([sys.executable, "-c", TOKEN_LOCAL], env=_env(4), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return _result(p.stdout)


def test_per_device_capacity_drops_what_each_device_would(token_local):
    """With drops, the token-local dispatch equals the single-device capacity dispatch run on each
    device's 64 tokens alone (outputs, drop fraction and the gradients of every input), and not
    the single-device dispatch of the whole batch (which drops other assignments).

    Tolerance 1e-5: the same rows meet the same weights; only the matmul kernels' blocking over
    a different number of rows may reorder float32 sums of d = 16 or f = 24 products of O(1)
    terms (each within 2**-24 relative, so ~1e-6 at most). The drop fractions are counts over 512
    assignments, exact in float32."""
    mesh, ref, one = token_local["mesh"], token_local["per_device"], token_local["one_device"]
    assert mesh["dropped"] == ref["dropped"] > 0
    assert _max_diff(mesh["y"], ref["y"]) <= TOL
    for a, b in zip(mesh["grads"], ref["grads"]):
        assert _max_diff(a, b) <= TOL
    assert one["dropped"] != mesh["dropped"] and _max_diff(one["y"], mesh["y"]) > 0.1


def test_routing_on_the_mesh_is_routing(token_local):
    """route_sharded (each device's top_k over its own tokens, data=2,expert=2) returns exactly
    route()'s weights, experts, probabilities and logits: routing is per token."""
    assert token_local["route_softmax"] and token_local["route_sigmoid"]


def test_data_parallel_divides_the_step_flops(token_local):
    """XLA's cost analysis of the compiled train step: on data=4 each device does at most 0.3x one
    device's FLOPs (0.25 is the ideal; the optimizer update of the replicated state is not
    divided). Before the token-local dispatch every device sorted the whole batch: 0.63x."""
    flops = token_local["flops"]
    assert flops["data=4"] <= 0.3 * flops["None"], flops


def test_partition_rules():
    m = MeshShape(data=1, fsdp=2, expert=2)
    expert = ["0", "blocks", "0", "ffn", "w_gate_up", "value"]
    assert tuple(param_spec(expert, (4, 32, 128), m)) == ("expert", None, "fsdp")
    moment = ["1", "opt_state", "1", "0", "mu", "blocks", "0", "ffn", "w_down", "value"]
    assert tuple(param_spec(moment, (4, 64, 32), m)) == ("expert", "fsdp", None)
    shared = ["0", "blocks", "0", "ffn", "shared", "w_gate_up", "value"]
    assert tuple(param_spec(shared, (32, 128), m)) == (None, "fsdp")
    assert tuple(param_spec(["1", "step", "value"], (), m)) == ()
    assert tuple(param_spec(["0", "final_norm", "scale"], (33,), m)) == (None,)   # nothing divides: replicated
    assert tuple(param_spec(expert, (4, 32, 128), MeshShape())) == (None, None, None)


def test_mesh_errors_are_one_line():
    for text, fragment in [("data=2,gpu=2", "AXIS=SIZE"), ("data=0", "size 0"), ("data=2,data=2", "twice")]:
        with pytest.raises(ConfigError, match=fragment):
            TrainConfig(mesh=text)
    with pytest.raises(ConfigError, match="needs 8 devices"):
        check_mesh(MeshShape(data=8), n_experts=4, batch_size=8, n_devices=4)
    with pytest.raises(ConfigError, match="batch_size = 6"):
        check_mesh(MeshShape(data=4), n_experts=4, batch_size=6, n_devices=4)
    with pytest.raises(ConfigError, match="must divide model.n_experts"):
        check_mesh(MeshShape(expert=3), n_experts=4, batch_size=6, n_devices=4)
    assert "mesh" not in TrainConfig().to_dict()                  # run ids of 1-device runs unchanged
    assert TrainConfig.from_dict({"mesh": "fsdp=2"}).mesh_shape == MeshShape(fsdp=2)
