"""Checkpoints of a training run: the orbax manager wrapper :class:`Checkpoints` (train state plus
a JSON record of the run so far) and :func:`load_checkpoint`, which gives back the trained model.

Where the checkpoints live inside a run's folder is :class:`moe_scaling.train.rundir.RunDir`'s
business. Two checkpoints are kept (``max_to_keep=2``), so when the newest one is damaged (a
truncated or missing file after a crash or a bad disk) :meth:`Checkpoints.restore_newest` falls back
to the one before it: a damaged checkpoint costs one checkpoint interval, not the run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.files import finite_or_none
from moe_scaling.model.transformer import Transformer
from moe_scaling.train.mesh import barrier
from moe_scaling.train.step import init_state

__all__ = ["Checkpoints", "load_checkpoint", "init_model_from"]


class Checkpoints:
    """orbax checkpoints of the train state plus a JSON record of the run so far.

    Sharded: each array is written by the processes that hold its shards, and :meth:`restore`
    reads it into the sharding of the state it is given, so a checkpoint written on one mesh
    restores on another. Asynchronous: :meth:`save` returns once the arrays are copied off the
    devices and the files are written in the background (a train step runs meanwhile);
    :meth:`latest`, :meth:`restore`, :meth:`wait` and :meth:`close` wait for the last save.
    The newest two checkpoints are kept: one to resume from, one to fall back to.
    """

    DAMAGED = "damaged"   # sub-folder for checkpoints that do not restore (orbax ignores it)

    def __init__(self, directory: str | os.PathLike):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.mngr = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                 enable_async_checkpointing=True))

    def wait(self) -> None:
        """Block until the last :meth:`save` is on disk."""
        self.mngr.wait_until_finished()

    def latest(self) -> int | None:
        self.wait()
        return self.mngr.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        ocp = self.ocp
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
            record=ocp.args.JsonSave(finite_or_none(record))), force=True)

    def restore(self, step: int, state):
        """``(state, record)`` of ``step``, read into the shapes, dtypes and shardings of ``state``."""
        pure, record = self._read(step, state)
        nnx.replace_by_pure_dict(state, pure)
        return state, record

    def _read(self, step: int, state):
        """``(pure state dict, record)`` of ``step`` in ``state``'s shapes and shardings; ``state``
        itself is left as it is."""
        ocp = self.ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
        return (self._item(step, "state", ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(abstract)),
                self._item(step, "record", ocp.JsonCheckpointHandler(), ocp.args.JsonRestore()))

    def _item(self, step: int, name: str, handler, args):
        """Item ``name`` of ``step`` read by ``handler`` itself, not by the manager: the manager's
        restore ends in a collective (``sync_global_devices``) that only the processes whose read
        succeeded reach, so when one process could not read its part the others waited in it for
        ever while that one waited to agree (:meth:`restore_newest`). Each process reads its own
        shards; nothing here waits for another process."""
        self.wait()
        try:
            return handler.restore(Path(self.mngr.directory) / str(step) / name, args=args)
        finally:
            handler.close()

    def restore_newest(self, state, *, log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        """``(state, record)`` of the newest checkpoint that restores, ``(state, None)`` when there is
        none. A checkpoint that raises while it is read (a truncated or deleted file, unreadable
        metadata) is moved to ``DAMAGED/<step>`` inside the folder, kept for inspection but out of
        orbax's sight (so it is neither resumed from, nor overwritten, nor counted by
        ``max_to_keep``), with one line through ``log`` naming its step; the next older one is
        tried.

        With several processes every process reads its own shards, so a damaged file may fail one
        process's read and not another's: the processes agree after each attempt (one failure
        fails the step for all), the first one moves the folder between two barriers, and all of
        them then try the same older step (without the agreement a process that read its shards
        went on training while the others fell back, and the run hung in its next collective).
        ``state`` changes only once every process has read the same step, so processes that fall
        back to none start from the same fresh state."""
        self.wait()
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                (pure, record), err = self._read(step, state), None
            except Exception as exc:  # noqa: BLE001 - any read failure means: try the older one
                err = exc
            if _everywhere(err is None):
                nnx.replace_by_pure_dict(state, pure)
                return state, record
            where = self._set_aside(step)
            log(f"checkpoint step {step} in {self.mngr.directory} does not restore ({_why(err)}); "
                f"moved to {where}, trying the one before it")
        return state, None

    def _set_aside(self, step: int) -> Path:
        """Move the folder of ``step`` to ``DAMAGED/<step>`` (``<step>-2``, ... when taken); the
        manager forgets it. Every process names the same destination and reloads only once the
        first process has moved the folder."""
        root = Path(self.mngr.directory)
        src, dest = root / str(step), root / self.DAMAGED / str(step)
        n = 1
        while dest.exists():
            n += 1
            dest = root / self.DAMAGED / f"{step}-{n}"
        barrier(f"set-aside-{step}-named")
        moved: OSError | None = None
        if jax.process_index() == 0 and src.exists():
            try:
                dest.parent.mkdir(exist_ok=True)
                src.rename(dest)
            except OSError as err:        # raised on every process below, not left to a barrier timeout
                moved = err
        if not _everywhere(moved is None):
            raise ConfigError(f"checkpoint step {step} in {root} does not restore and could not be moved to "
                              f"{dest}: {moved or 'failed on process 0'}; move or delete it, then resume")
        self.mngr.reload()
        return dest

    def restore_model(self, step: int, state):
        """``state`` with its model part (``state[0]``) replaced by the model saved at ``step``
        (whatever optimiser that run used); the optimiser part is left as it is."""
        ocp = self.ocp
        pure = nnx.to_pure_dict(state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure[0])
        got = self._item(step, "state", ocp.PyTreeCheckpointHandler(), ocp.args.PyTreeRestore(
            item={0: abstract}, restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                                          {0: abstract}), partial_restore=True))
        pure[0] = got[0]
        nnx.replace_by_pure_dict(state, pure)
        return state

    def close(self) -> None:
        self.wait()
        self.mngr.close()


def _everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (itself with one process). The processes first meet
    at a :func:`~moe_scaling.train.mesh.barrier`: the gather is a collective, and one process can
    arrive long after another (a failed read makes orbax print a warning per array)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    barrier("checkpoint-agree")
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _why(err: Exception | None) -> str:
    """One line on why a read failed: ``err``'s type and first line (orbax's TensorStore errors run
    on for pages), or, where this process read its part (``err`` None), that another could not."""
    if err is None:
        return "another process could not read its part"
    return f"{type(err).__name__}: " + (str(err).splitlines() or [""])[0].split(" See full TensorStore")[0][:200]


def _read_everywhere(read: Callable[[], Any], what: str) -> Any:
    """``read()`` on every process, or a ConfigError naming ``what`` on every process when it raised
    on any: a process whose read failed stops, and the others must not go on to wait for it in
    their next collective (with one process: ``read()``, its failure as a ConfigError)."""
    try:
        value, err = read(), None
    except Exception as exc:  # noqa: BLE001 - any read failure fails the read on every process
        value, err = None, exc
    if not _everywhere(err is None):
        raise ConfigError(f"{what} could not be read into this run's model ({_why(err)})") from err
    return value


def load_checkpoint(ckpt_dir: str | os.PathLike, model_cfg: ModelConfig, train_cfg: TrainConfig,
                    data_cfg: DataConfig, *, step: int | None = None) -> tuple[Transformer, dict]:
    """The model saved by :func:`moe_scaling.train.loop.train` in ``ckpt_dir`` (latest step, or ``step``) and the run's
    JSON record (``step``, ``status``, ``curve``, ``metrics``, ``configs``, ...)."""
    if not Path(ckpt_dir).is_dir():
        raise ConfigError(f"ckpt_dir = {str(ckpt_dir)!r}: no such directory; train first")
    ckpt = Checkpoints(ckpt_dir)
    try:
        step = ckpt.latest() if step is None else step
        if step is None:
            raise ConfigError(f"ckpt_dir = {str(ckpt_dir)!r}: holds no checkpoint; train first")
        graphdef, state = init_state(model_cfg, train_cfg, train_cfg.steps(data_cfg.seq_len))
        state, record = _read_everywhere(lambda: ckpt.restore(step, state),
                                         f"ckpt_dir = {str(ckpt_dir)!r}: checkpoint step {step}")
    finally:
        ckpt.close()
    model, _ = nnx.merge(graphdef, state)
    return model, record


def init_model_from(state, ckpt_dir: str | os.PathLike):
    """``state`` (of ``(model, optimizer)``) with the model weights of the latest checkpoint in
    ``ckpt_dir``: how a recipe stage starts from the previous stage's final model. Shapes must
    match (same ModelConfig up to ``max_seq_len``); a missing checkpoint is a ConfigError."""
    ckpt = Checkpoints(ckpt_dir)
    try:
        step = ckpt.latest()
        if step is None:
            raise ConfigError(f"init_from = {str(ckpt_dir)!r}: holds no checkpoint; run the previous stage first")
        return _read_everywhere(lambda: ckpt.restore_model(step, state),
                                f"init_from = {str(ckpt_dir)!r}: checkpoint step {step}")
    finally:
        ckpt.close()
