"""Seed batching: runs that differ only in their seed (and a few scalar hyperparameters) trained
together as one program, vmapped over a leading model axis.

:func:`train_group` trains ``N`` members of one model shape at once. Each member is a full
:func:`moe_scaling.train.loop.train` run of its own: its own checkpoint folder (the same layout and
record, so a member's checkpoint resumes with ``train()`` and the other way round), curve, eval
losses, status and :class:`TrainResult`. The per-member bookkeeping (curve rows, log windows,
evals, checkpoints, the result) is ``loop._Run``'s, shared with ``train()``.

* **What may differ.** ``batching.BATCHED_FIELDS``: ``seed`` (initialisation and data order) and
  ``lr``, ``min_lr_ratio``, ``weight_decay``, which enter the optimiser as traced per-member
  scalars. Every other field of the three configs must be equal (``batching.batch_key``).
* **The program.** The nnx states of the members are stacked along a new leading axis; one jitted
  step is :func:`jax.vmap` of one member's AdamW step (:func:`_member_step`) with the stacked state
  donated. A member whose loss is not finite (it diverged) or that has finished keeps its state:
  its update is masked in the step, and the others go on. Evaluation is one vmapped call over the
  members for the whole eval set.
* **Equality with solo runs.** The math is the same, but batched matmuls round differently in the
  last bits: per-step losses equal solo runs within ~1e-6 over the first steps (tested: 1e-5);
  discrete routing amplifies last-bit differences over a long run, so final losses agree with a solo
  run within the seed-to-seed spread, not bit for bit. The same group (same members, same start
  steps) is bit-identical from run to run, so a group resumed after a crash continues exactly.
* **Resume.** Each member resumes from its own latest checkpoint. Members may stand at different
  steps (a crash between two members' checkpoint writes): each trains its own remaining steps and
  one that is done waits, masked, until the last one finishes.
* **Memory.** :func:`moe_scaling.train.batching.group_size` caps the members trained together by
  a simple estimate of one member's memory against a fraction of the machine's available memory.
* **Time.** A member's ``step_time_s``, ``wall_s`` and compile time are its share (the group's
  divided by the number of members), so sums over runs stay the sweep's real time; ``metrics``
  holds ``group_size`` and ``group_wall_s``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import types
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.routing import resolve_dispatch
from moe_scaling.train.batching import BATCHED_FIELDS, batch_key
from moe_scaling.train.checkpoints import Checkpoints
from moe_scaling.train.data import eval_windows, load_tokens, train_batch
from moe_scaling.train.loop import (TrainResult, _check_compatible, run_configs, _resume, _Run, compiled,
                                    end_step_of, eval_program, program_config)
from moe_scaling.train.step import _dtype, apply_step, init_state, make_optimizer

__all__ = ["train_group"]

_TRACED = BATCHED_FIELDS[1:]    # the optimiser's per-member scalars (the seed stays on the host)


# --------------------------------------------------------------------------------------
# The vmapped step
# --------------------------------------------------------------------------------------


def _member_step(graphdef, kw, bias_update_rate, base: TrainConfig, steps: int, hp: dict, state,
                 inputs, targets):
    """One member's train step, as :func:`moe_scaling.train.step._train_step` but with the
    optimiser rebuilt from the member's traced scalars ``hp`` (:data:`_TRACED`):
    :func:`make_optimizer` reads only attributes, so a namespace of ``base``'s fields with those
    replaced stands in for the config."""
    model, opt = nnx.merge(graphdef, state)
    opt.tx = make_optimizer(types.SimpleNamespace(**(base.to_dict() | hp)), steps)
    metrics = apply_step(model, opt, kw, bias_update_rate, inputs, targets)
    return nnx.state((model, opt)), metrics


def _group_step(graphdef, kw, bias_update_rate, base, steps, hp, active, state, inputs, targets):
    """The step of every member at once: ``active [N]`` bool; a member that is inactive, or whose
    loss is not finite, keeps its state."""
    new, metrics = jax.vmap(partial(_member_step, graphdef, kw, bias_update_rate, base, steps))(
        hp, state, inputs, targets)
    keep = active & jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["total_loss"])
    new = jax.tree.map(lambda n, o: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, state)
    return new, metrics


def _close(ckpt: Checkpoints | None) -> None:
    """Close a member's checkpoints after an error (it may be closed already)."""
    if ckpt is not None:
        try:
            ckpt.close()
        except Exception:  # noqa: BLE001 - the error being raised matters, not this one
            pass


def _stack(states: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _member(stacked: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], stacked)


# --------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------


class _Group:
    """The stacked state, the members' ``_Run``s and the eval of the current step for all."""

    def __init__(self, runs: list[_Run], stacked: Any, eval_losses: Callable[[Any], np.ndarray]):
        self.runs, self.stacked, self.eval_losses = runs, stacked, eval_losses
        self.k = 0                    # group steps done in this call
        self._eval_k: int | None = None
        self._evals: np.ndarray | None = None

    def eval_loss(self, i: int) -> float:
        """Member ``i``'s eval loss at the current step (one vmapped eval serves every member)."""
        if self._eval_k != self.k:
            self._evals, self._eval_k = self.eval_losses(self.stacked), self.k
        return float(np.mean(self._evals[i], dtype=np.float64))

    def sync(self, i: int) -> None:
        """Give member ``i``'s ``_Run`` its own state (before a checkpoint or the end)."""
        self.runs[i].state = _member(self.stacked, i)


def train_group(model_cfg: ModelConfig, train_cfgs: Sequence[TrainConfig], data_cfg: DataConfig, *,
                ckpt_dirs: Sequence[str | os.PathLike | None] | None = None,
                on_log: Callable[[int, dict], None] | None = None,
                on_end: Callable[[int, TrainResult], None] | None = None,
                stop_at_step: int | None = None,
                events_dirs: Sequence[str | os.PathLike | None] | None = None) -> list[TrainResult]:
    """Train one :func:`moe_scaling.train.loop.train` run per ``train_cfgs`` entry, all at once.

    Args:
      train_cfgs: the members' configs; equal except for :data:`BATCHED_FIELDS` (else a
        :class:`ConfigError`).
      ckpt_dirs: one checkpoint folder per member (or None): as ``train()``'s ``ckpt_dir``, each
        member resumes from its own.
      on_log: ``on_log(i, entry)`` with member ``i``'s ``train()`` log entries.
      on_end: ``on_end(i, result)`` as soon as member ``i`` has ended: when it diverges, else when
        the group ends.
      stop_at_step: as in ``train()``: stop every member once it has done this many steps.
      events_dirs: one TensorBoard folder per member (or None), as ``train()``'s ``events_dir``.

    Returns:
      The members' :class:`TrainResult`s in order; a diverged member has status ``diverged`` and
      the others train on.
    """
    t_call = time.perf_counter()
    n = len(train_cfgs)
    if n == 0:
        raise ConfigError("train_group: no members; give at least one TrainConfig")
    if len({batch_key(model_cfg, c, data_cfg) for c in train_cfgs}) > 1:
        raise ConfigError(f"train_group: members differ in fields other than {', '.join(BATCHED_FIELDS)}; "
                          "train them separately")
    ckpt_dirs = list(ckpt_dirs) if ckpt_dirs is not None else [None] * n
    events_dirs = list(events_dirs) if events_dirs is not None else [None] * n
    for name, dirs in (("ckpt_dirs", ckpt_dirs), ("events_dirs", events_dirs)):
        if len(dirs) != n:
            raise ConfigError(f"train_group: {len(dirs)} {name} for {n} members; give one per member")
    train_tokens, valid_tokens, corpus_hash = load_tokens(data_cfg)
    _check_compatible(model_cfg, data_cfg, train_tokens, valid_tokens)
    base = train_cfgs[0]
    seq, batch = data_cfg.seq_len, base.batch_size
    steps = base.steps(seq)
    end_step = end_step_of(steps, stop_at_step)
    dispatch = resolve_dispatch(base.dispatch)
    eval_dispatch = "dropless" if dispatch == "capacity" else dispatch
    eval_set = eval_windows(valid_tokens, batch, seq, base.eval_batches)

    ckpts: list[Checkpoints | None] = []
    states, records = [], []
    try:
        for cfg, folder in zip(train_cfgs, ckpt_dirs):
            graphdef, state = init_state(model_cfg, cfg, steps)
            ckpt = Checkpoints(folder) if folder is not None else None
            ckpts.append(ckpt)
            state, record = _resume(ckpt, folder, state, run_configs(model_cfg, cfg, data_cfg), corpus_hash,
                                    data_cfg)
            states.append(state)
            records.append(record)
    except Exception:
        for c in ckpts:
            _close(c)
        raise
    stacked = _stack(states)
    del states
    t0 = time.perf_counter()
    losses = eval_program(graphdef, model_cfg, base, eval_dispatch, stacked, eval_set, members=n)
    eval_compile_s = time.perf_counter() - t0
    group = _Group([], stacked, losses)
    for i, cfg in enumerate(train_cfgs):
        log = None if on_log is None else partial(on_log, i)
        run = _Run(None, records[i], train_cfg=cfg, seq=seq, steps=steps,
                   configs=run_configs(model_cfg, cfg, data_cfg), corpus_hash=corpus_hash, ckpt=ckpts[i],
                   eval_loss=lambda _state, i=i: group.eval_loss(i), on_log=log, events_dir=events_dirs[i])
        run.metrics.update(dispatch=dispatch, eval_dispatch=eval_dispatch, group_size=n)
        run.timings["compile_s"] += eval_compile_s / n
        group.runs.append(run)
    results: list[TrainResult | None] = [None] * n

    def end(i: int, status: str, diverged_step: int | None) -> None:
        group.sync(i)
        r = group.runs[i].finish(status, diverged_step, end_step, t_call)
        wall = time.perf_counter() - t_call
        r.metrics["group_wall_s"] = wall
        results[i] = dataclasses.replace(r, wall_s=wall / n)
        if on_end is not None:
            on_end(i, results[i])

    try:
        _train(group, graphdef, model_cfg, train_cfgs, train_tokens, steps, end_step, dispatch, end)
        for i in range(n):
            if results[i] is None:
                end(i, "completed", None)
    except BaseException:
        for i, c in enumerate(ckpts):
            if results[i] is None:
                _close(c)
                if group.runs[i].events is not None:
                    group.runs[i].events.close()
        raise
    return results


def _train(group: _Group, graphdef: Any, model_cfg: ModelConfig, cfgs: Sequence[TrainConfig],
           tokens: np.ndarray, steps: int, end_step: int, dispatch: str,
           end: Callable[[int, str, int | None], None]) -> None:
    """The group's step loop: the step-0 evals, then every member to ``end_step`` or divergence.
    A member that diverges is ended at once (``end(i, "diverged", step)``); the caller ends the
    others."""
    runs, n = group.runs, len(group.runs)
    base = cfgs[0]
    batch, seq = base.batch_size, runs[0].seq
    for r in runs:
        if r.start == 0 and not r.curve:
            r.curve.append({"step": 0, "tokens": 0, "train_loss": float("nan"), "eval_loss": r.evaluate(0)})
    active = np.array([r.start < end_step for r in runs])
    if not active.any():
        return

    def batches(k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every member's batch of its own step ``start + k`` (a done member's is a stand-in)."""
        pairs = [train_batch(tokens, batch, seq, c.seed, min(r.start + k, steps - 1)) for c, r in zip(cfgs, runs)]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    hp = {f: jnp.asarray([getattr(c, f) for c in cfgs], jnp.float32) for f in _TRACED}
    kw = dict(dispatch=dispatch, capacity_factor=base.capacity_factor, dtype=_dtype(base.dtype),
              aux_loss_coef=base.aux_loss_coef, z_loss_coef=base.z_loss_coef)
    static = program_config(base, *BATCHED_FIELDS)
    step_fn = jax.jit(partial(_group_step, graphdef, kw, base.bias_update_rate, static, steps), donate_argnums=2)
    x, y = batches(0)
    t0 = time.perf_counter()
    key = ("group", model_cfg, static, steps, dispatch, n, (batch, seq))
    step_fn = compiled(key, step_fn, hp, active, group.stacked, x, y)
    compile_s = time.perf_counter() - t0
    step_time = 0.0
    for r in runs:
        r.timings["compile_s"] += compile_s / n
    while active.any():
        t0 = time.perf_counter()
        group.stacked, metrics = step_fn(hp, active, group.stacked, x, y)
        group.k += 1
        x, y = batches(group.k)          # prepare the next batches while the step runs
        metrics = jax.device_get(metrics)
        step_time += time.perf_counter() - t0
        for i in np.flatnonzero(active):
            r = runs[i]
            r.step_time = step_time / n
            step = r.start + group.k
            loss = float(metrics["loss"][i])
            if not (math.isfinite(loss) and math.isfinite(float(metrics["total_loss"][i]))):
                active[i] = False
                end(i, "diverged", r.diverge(step, loss))
                continue
            r._logged(step, loss, {name: v[i] for name, v in metrics.items()}, None)
            if step % base.ckpt_every == 0 and step < end_step:
                group.sync(i)
                r.save(step, "running")
            if step >= end_step:
                active[i] = False
