"""Stage 4: quantization-aware training with INT4 group-32 weights (fp16 scales).

:func:`qat` continues a trained model for ``train_cfg.tokens`` tokens with every linear and expert
weight replaced, in the forward pass, by its INT4 fake quantization
(:func:`moe_scaling.model.quant.fake_quant_params`, straight-through gradients): the optimiser
updates the float "latent" weights, the loss is that of the quantized model. It is a library
function for a recipe's stage runner: it takes the three configs and an initial model (a
:class:`Transformer`, its ``nnx.State``, or a ``train()`` checkpoint folder) and returns the
QAT'd model and its losses; it writes nothing.

The step is the trainer's (``moe_scaling.train.step.loss_fn``, ``make_optimizer``: AdamW with the
train config's schedule, clipping and weight decay), with a fresh optimiser state (stage 4 starts
its own schedule). MoE layers train with the resolved dispatch and evaluate ``dropless``.
:func:`eval_loss` gives the float or post-training-quantized (``quantize=True``) eval loss of any
model on the run's fixed held-out windows, so f32 / PTQ / QAT losses are comparable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.quant import GROUP, check_quantizable, fake_quant_params
from moe_scaling.model.routing import resolve_dispatch
from moe_scaling.model.transformer import Transformer
from moe_scaling.train.data import eval_windows, load_tokens, train_batch
from moe_scaling.train.events import EventLog, train_scalars
from moe_scaling.train.loop import _window_metrics
from moe_scaling.train.step import _dtype, loss_fn, lr_schedule, make_optimizer

__all__ = ["QATResult", "qat", "eval_loss", "initial_model"]


@dataclass
class QATResult:
    model: Transformer          # the QAT'd float latent weights (quantize them to deploy)
    steps: int
    initial_eval_loss: float    # the initial model, float weights
    initial_ptq_loss: float     # the initial model, INT4 weights (post-training quantization)
    final_eval_loss: float      # the QAT'd model, INT4 weights
    curve: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def initial_model(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                  init: Any) -> Transformer:
    """A :class:`Transformer` from ``init``: a Transformer, an ``nnx.State`` of one, or the
    checkpoint folder of a ``train()`` run of these configs."""
    if isinstance(init, Transformer):
        return init
    if isinstance(init, nnx.State):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
        return nnx.merge(graphdef, init)
    if isinstance(init, (str, os.PathLike)):
        from moe_scaling.train.checkpoints import load_checkpoint
        model, _ = load_checkpoint(init, model_cfg, train_cfg, data_cfg)
        return model
    raise ConfigError(f"init: got {type(init).__name__}; pass a Transformer, its nnx.State or a checkpoint folder")


def _split(model: Transformer):
    return nnx.split(model, nnx.Param, ...)


def _forward_loss(graphdef, kw, quantize, params, rest, inputs, targets):
    if quantize:
        params = fake_quant_params(params)
    model = nnx.merge(graphdef, params, rest)
    return loss_fn(model, inputs, targets, **kw)


def eval_loss(model: Transformer, train_cfg: TrainConfig, data_cfg: DataConfig, *,
              quantize: bool = False, valid_tokens: np.ndarray | None = None) -> float:
    """Mean cross-entropy on the fixed held-out windows (``train_cfg.eval_batches`` batches), MoE
    layers ``dropless``; with ``quantize`` every linear/expert weight is INT4 group-32."""
    if valid_tokens is None:
        _, valid_tokens, _ = load_tokens(data_cfg)
    graphdef, params, rest = _split(model)
    kw = dict(dispatch="dropless", capacity_factor=train_cfg.capacity_factor, dtype=_dtype(train_cfg.dtype))
    fn = jax.jit(lambda p, r, x, y: _forward_loss(graphdef, kw, quantize, p, r, x, y)[1]["loss"])
    windows = eval_windows(valid_tokens, train_cfg.batch_size, data_cfg.seq_len, train_cfg.eval_batches)
    return float(np.mean([float(fn(params, rest, x, y)) for x, y in windows]))


def qat(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, init: Any, *,
        eval_every: int | None = None, events_dir: str | os.PathLike | None = None) -> QATResult:
    """Quantization-aware training of ``init`` (see :func:`initial_model`) for
    ``train_cfg.tokens`` tokens; batches are drawn from ``(train_cfg.seed, step)`` like ``train()``.
    ``events_dir``: TensorBoard scalars at every eval row (``eval/loss`` is the INT4 model's)."""
    check_quantizable(model_cfg, GROUP)
    t0 = time.perf_counter()
    model = initial_model(model_cfg, train_cfg, data_cfg, init)
    train_tokens, valid_tokens, _ = load_tokens(data_cfg)
    seq, batch = data_cfg.seq_len, train_cfg.batch_size
    steps = train_cfg.steps(seq)
    dispatch = resolve_dispatch(train_cfg.dispatch)
    graphdef, params, rest = _split(model)
    kw = dict(dispatch=dispatch, capacity_factor=train_cfg.capacity_factor, dtype=_dtype(train_cfg.dtype),
              aux_loss_coef=train_cfg.aux_loss_coef, z_loss_coef=train_cfg.z_loss_coef)
    tx = make_optimizer(train_cfg, steps)
    opt_state = tx.init(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, inputs, targets):
        grad_fn = jax.value_and_grad(partial(_forward_loss, graphdef, kw, True), has_aux=True)
        (_, metrics), grads = grad_fn(params, rest, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    ev = partial(eval_loss, train_cfg=train_cfg, data_cfg=data_cfg, valid_tokens=valid_tokens)
    init_f32, init_ptq = ev(model), ev(model, quantize=True)
    curve = [{"step": 0, "eval_loss_int4": init_ptq}]
    events = EventLog(events_dir) if events_dir is not None else None
    lr, t_steps = lr_schedule(train_cfg, steps), 0.0
    if events is not None:
        events.scalars(0, {"eval/loss": init_ptq})

    def row(s: int, metrics: dict, eval_int4: float) -> None:
        curve.append({"step": s + 1, "train_loss": float(metrics["loss"]), "eval_loss_int4": eval_int4})
        if events is not None:
            tps = (s + 1) * batch * seq / max(t_steps, 1e-9)
            events.scalars(s + 1, {**train_scalars(float(metrics["loss"]), float(lr(s)), tps,
                                                   _window_metrics([metrics])), "eval/loss": eval_int4})

    every = eval_every or max(1, steps)
    for s in range(steps):
        x, y = train_batch(train_tokens, batch, seq, train_cfg.seed, s)
        t = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, rest, x, y)
        metrics = jax.device_get(metrics)
        t_steps += time.perf_counter() - t
        if not np.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"qat: non-finite loss at step {s}")
        if (s + 1) % every == 0 and s + 1 < steps:
            row(s, metrics, ev(nnx.merge(graphdef, params, rest), quantize=True))
    model = nnx.merge(graphdef, params, rest)
    final = ev(model, quantize=True)
    row(steps - 1, metrics, final)
    if events is not None:
        events.close()
    return QATResult(model=model, steps=steps, initial_eval_loss=init_f32, initial_ptq_loss=init_ptq,
                     final_eval_loss=final, curve=curve, wall_s=time.perf_counter() - t0)
