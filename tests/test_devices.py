"""Each local sweep worker gets its own devices (moe_scaling.sweep.devices), checked on CPU
through the assignment it makes."""

import multiprocessing
import os

import pytest

from moe_scaling.errors import InputError
from moe_scaling.sweep.devices import Accelerators, assign_devices, detect_accelerators, worker_env


def test_gpus_are_split_without_overlap():
    envs = assign_devices(3, 2, Accelerators("cuda", tuple("012345")))
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"},
                    {"CUDA_VISIBLE_DEVICES": "4,5"}]
    envs = assign_devices(2, 1, Accelerators("rocm", ("3", "7")))
    assert envs == [{"HIP_VISIBLE_DEVICES": "3"}, {"HIP_VISIBLE_DEVICES": "7"}]


def test_too_many_workers_is_one_line():
    with pytest.raises(InputError, match=r"--workers 3 x --devices-per-run 2 = 6 cuda devices, 4 visible"):
        assign_devices(3, 2, Accelerators("cuda", ("0", "1", "2", "3")))


def test_cpu_workers_get_host_devices():
    assert assign_devices(2, 1, Accelerators("cpu", ())) == [{}, {}]
    envs = assign_devices(2, 4, Accelerators("cpu", ()),
                          base_env={"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"})
    assert envs == [{"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"}] * 2


def test_detect_reads_visible_devices_first():
    assert detect_accelerators({"CUDA_VISIBLE_DEVICES": "2,5"}) == Accelerators("cuda", ("2", "5"))
    assert detect_accelerators({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"}).kind == "cpu"


def _report(queue):
    queue.put(os.environ.get("CUDA_VISIBLE_DEVICES"))


def test_spawned_worker_sees_only_its_devices():
    """What _run_processes does: set the worker's variables around the spawn."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = []
    for env in assign_devices(2, 1, Accelerators("cuda", ("0", "1"))):
        with worker_env(env):
            p = ctx.Process(target=_report, args=(queue,))
            p.start()
        p.join(60)
        seen.append(queue.get(timeout=10))
    assert seen == ["0", "1"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
