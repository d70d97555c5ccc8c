"""Device meshes: data, fully sharded (FSDP) and expert parallelism over a ``jax.sharding.Mesh``.

A mesh has three named axes, written ``data=D,fsdp=F,expert=X`` (``--mesh`` of ``moe-train``,
``TrainConfig.mesh``; missing axes are 1):

* ``data``: data parallel. Each batch row lives on one slice of the ``data`` axis.
* ``fsdp``: fully sharded data parallel. The batch is split over it too, and every parameter and
  its AdamW moments (``mu``, ``nu``) are split along their largest dimension that the axis size
  divides (replicated only when none does, e.g. the norm scales of a tiny model).
* ``expert``: expert parallel. The routed experts' weights (``ffn.w_gate_up [E, d, 2f]``,
  ``ffn.w_down [E, f, d]`` and their moments) are split over their expert dimension; the batch is
  split over it as well, so the expert axis also does data-parallel work for the dense layers.

The rules are read off the path of each array in the nnx state of ``(model, optimizer)``
(:func:`param_spec`), so the model code carries no sharding annotations. The step itself is the
same jitted function as on one device, compiled with ``in_shardings``/``out_shardings``: XLA's
SPMD partitioner inserts the collectives (all-gathers of FSDP weights, reduce-scatters of their
gradients, the token exchange of the expert layers). A run without a mesh (the default) does not
come through here at all and compiles exactly the single-device step.

Several processes (``jax.distributed``): :func:`initialize_distributed` connects them; each then
builds the same global mesh over every process's devices, and :meth:`Placement.batch` hands each
process only the rows of the global batch its own devices hold
(:func:`jax.make_array_from_callback` asks for the addressable shards only).

MoE layers: the jitted step passes the mesh to the model; each device selects the experts of its
own tokens (:func:`moe_scaling.model.routing.route_sharded`: XLA would gather every token for
``top_k``), and with ``capacity`` dispatch each MoE
layer routes only its device's tokens inside :func:`jax.shard_map`, exchanging rows with the
expert owners by ``all_to_all`` over ``expert``
(:func:`moe_scaling.model.routing.moe_experts_sharded`; the capacity is per device, which changes
which tokens drop, see there). ``dropless``, ``ragged`` and ``reference`` keep the global dispatch
(exact, but every device sorts the whole batch: it does not scale); the evaluation step, which uses
``dropless``, is one of those.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moe_scaling.config import MESH_AXES as AXES, MeshShape
from moe_scaling.errors import ConfigError

__all__ = ["AXES", "MeshShape", "check_mesh", "make_mesh", "param_spec", "state_specs", "Placement",
           "initialize_distributed", "distributed_from_env", "barrier"]

BATCH_AXES = AXES  # the batch dimension is split over every axis
_EXPERT_WEIGHTS = ("w_gate_up", "w_down")


def check_mesh(shape: MeshShape, *, n_experts: int, batch_size: int, n_devices: int,
               field: str = "train.mesh") -> None:
    """One-line :class:`ConfigError` unless ``shape`` fits the model, the batch and the devices."""
    if shape.size > n_devices:
        raise ConfigError(f"{field} = {str(shape)!r}: needs {shape.size} devices, {n_devices} are visible; "
                          "shrink the mesh (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                          "gives N host devices)")
    if jax.process_count() > 1 and shape.size != n_devices:
        raise ConfigError(f"{field} = {str(shape)!r}: {shape.size} devices, but the {jax.process_count()} "
                          f"processes hold {n_devices}; a multi-process mesh must use every device")
    if batch_size % shape.size:
        raise ConfigError(f"train.batch_size = {batch_size}: must be a multiple of the mesh's "
                          f"{shape.size} devices ({shape}); change batch_size or the mesh")
    if shape.expert > 1 and n_experts % shape.expert:
        raise ConfigError(f"{field} = {str(shape)!r}: expert axis {shape.expert} must divide "
                          f"model.n_experts ({n_experts}); pick a divisor of n_experts")


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``(data, fsdp, expert)`` mesh over the first ``shape.size`` devices (all of them across
    processes). Axes are ``Auto``: shardings are set on the jitted step's inputs and outputs and
    the partitioner propagates them, so the model code needs no annotations."""
    devices = list(jax.devices() if devices is None else devices)[: shape.size]
    return jax.make_mesh(shape.shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def param_spec(names: Sequence[str], shape: tuple[int, ...], mesh: MeshShape) -> P:
    """The :class:`PartitionSpec` of one array of the train state, from its path ``names``.

    Routed expert weights (``...ffn.w_gate_up`` / ``...ffn.w_down`` with 3 dimensions, in the model
    or in an optimizer moment) put their expert dimension on ``expert``. Then, with ``fsdp > 1``,
    the largest remaining dimension that ``fsdp`` divides goes on ``fsdp``. Everything else
    (scalars, the step count, small vectors no size divides) is replicated.
    """
    spec: list[str | None] = [None] * len(shape)
    names = [n for n in names if n != "value"]
    if (mesh.expert > 1 and len(shape) == 3 and names and names[-1] in _EXPERT_WEIGHTS
            and len(names) >= 2 and names[-2] == "ffn" and shape[0] % mesh.expert == 0):
        spec[0] = "expert"
    if mesh.fsdp > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % mesh.fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return P(*spec)


def state_specs(state: Any, mesh: MeshShape) -> Any:
    """:func:`param_spec` for every array of an nnx state (concrete or abstract), as the same tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: param_spec(_names(path), tuple(a.shape), mesh), state)


@dataclass(frozen=True)
class Placement:
    """Where the train state and the batches live on a mesh: the shardings a jitted step is
    compiled with and the functions that put host data there."""

    mesh: Mesh
    shape: MeshShape
    state: Any               # tree of NamedSharding, the structure of the nnx state
    batch: NamedSharding     # [batch, seq] arrays: rows split over every axis
    replicated: NamedSharding

    @classmethod
    def create(cls, shape: MeshShape, state: Any, devices: Sequence[Any] | None = None) -> "Placement":
        mesh = make_mesh(shape, devices)
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state, shape),
                                 is_leaf=lambda x: isinstance(x, P))
        return cls(mesh, shape, shardings, NamedSharding(mesh, P(BATCH_AXES, None)),
                   NamedSharding(mesh, P()))

    def put_state(self, state: Any) -> Any:
        """Place a host-side state (the same values in every process) on the mesh."""
        def put(a, sharding):
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.tree.map(put, state, self.state)

    def put_batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Place global ``[batch, seq]`` host arrays: each process supplies only the rows of its
        own devices."""
        return tuple(jax.make_array_from_callback(a.shape, self.batch, lambda idx, a=a: a[idx])
                     for a in arrays)


# --------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------


def distributed_from_env(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> tuple[str, int, int] | None:
    """``(coordinator, num_processes, process_id)`` from the arguments, else from
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; ``None`` for a
    single process. Missing or inconsistent values are one-line :class:`ConfigError`."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    num = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if coordinator is None and num is None and pid is None:
        return None
    if coordinator is None or num is None or pid is None:
        raise ConfigError("--coordinator/--num-processes/--process-id: give all three (or "
                          "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or none")
    if not re.fullmatch(r"[^\s:]+:\d+", coordinator):
        raise ConfigError(f"--coordinator = {coordinator!r}: must be HOST:PORT; e.g. 10.0.0.1:1234")
    try:
        num, pid = int(num), int(pid)
    except ValueError:
        raise ConfigError(f"--num-processes = {num!r} / --process-id = {pid!r}: must be whole numbers") from None
    if num < 1 or not 0 <= pid < num:
        raise ConfigError(f"--process-id = {pid}: must be in 0..{num - 1} for --num-processes {num}")
    return coordinator, num, pid


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Connect this process to the others with :func:`jax.distributed.initialize` (before any
    other JAX call). On CPU, collectives across processes use gloo."""
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Wait until every process gets here (nothing with one process).

    A barrier of JAX's coordination service, not a collective: on CPU the first collective of a
    device group sets up a gloo context through the service's key-value store and gives up after
    30 s (``DEADLINE_EXCEEDED: GetKeyValue() timed out with key: cpu:gloo/...``), so a process
    that reaches a new program more than 30 s after the others (compiling on a busy machine,
    printing orbax's warnings after a failed checkpoint read) failed the run. Called before a
    process runs a freshly compiled multi-process program and before processes agree on a
    checkpoint, it lets the slowest catch up for up to ``timeout_s``. Every process calls the
    same barriers in the same order, so a per-process count makes each name unique."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=f"moe-scaling-{name}-{next(_BARRIERS)}",
                                        timeout_ms=int(timeout_s * 1000))


def place_run(mesh: str | MeshShape | None, model_cfg: Any, batch_size: int, state: Any) -> Placement | None:
    """The :class:`Placement` of a run on ``mesh`` (checked against the model, the batch and the
    visible devices), or ``None`` for one device: ``None``, ``""`` or a mesh of size 1."""
    shape = mesh if isinstance(mesh, MeshShape) else MeshShape.parse(mesh)
    if shape.size == 1 and jax.process_count() == 1:
        return None
    check_mesh(shape, n_experts=model_cfg.n_experts, batch_size=batch_size, n_devices=jax.device_count())
    return Placement.create(shape, state)
