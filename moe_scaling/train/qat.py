"""Stage 4: quantization-aware training with INT4 group-32 weights (fp16 scales).

:func:`qat` continues a trained model for ``train_cfg.tokens`` tokens with every linear and expert
weight replaced, in the forward pass, by its INT4 fake quantization
(:func:`moe_scaling.model.quant.fake_quant_params`, straight-through gradients): the optimiser
updates the float "latent" weights, the loss is that of the quantized model. It is a library
function for a recipe's stage runner: it takes the three configs and an initial model (a
:class:`Transformer`, its ``nnx.State``, or a ``train()`` checkpoint folder) and returns the
QAT'd model and its losses; with ``ckpt_dir`` it checkpoints periodically and resumes like
pre-training (:func:`moe_scaling.train.loop.resume_and_train`), else it writes nothing.

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
from typing import Any, Callable

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
from moe_scaling.train.loop import compile_for, resume_and_train, run_configs
from moe_scaling.train.step import _dtype, loss_fn, make_optimizer

__all__ = ["QATResult", "qat", "eval_loss", "initial_model"]


@dataclass
class QATResult:
    model: Transformer          # the QAT'd float latent weights (quantize them to deploy)
    steps: int
    initial_eval_loss: float    # the initial model, float weights
    initial_ptq_loss: float     # the initial model, INT4 weights (post-training quantization)
    final_eval_loss: float      # the QAT'd model, INT4 weights
    curve: list[dict] = field(default_factory=list)   # the trainer's curve; eval losses are INT4
    wall_s: float = 0.0
    result: Any = None          # the trainer's TrainResult (status, steps, curve, metrics)


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


def _evaluator(graphdef, train_cfg: TrainConfig, data_cfg: DataConfig, valid_tokens: np.ndarray,
               quantize: bool):
    """``loss(params, rest)``: the mean cross-entropy on the fixed held-out windows, MoE layers
    ``dropless``, jitted once (INT4 group-32 weights with ``quantize``)."""
    kw = dict(dispatch="dropless", capacity_factor=train_cfg.capacity_factor, dtype=_dtype(train_cfg.dtype))
    fn = jax.jit(lambda p, r, x, y: _forward_loss(graphdef, kw, quantize, p, r, x, y)[1]["loss"])
    windows = eval_windows(valid_tokens, train_cfg.batch_size, data_cfg.seq_len, train_cfg.eval_batches)
    return lambda params, rest: float(np.mean([float(fn(params, rest, x, y)) for x, y in windows]))


def eval_loss(model: Transformer, train_cfg: TrainConfig, data_cfg: DataConfig, *,
              quantize: bool = False, valid_tokens: np.ndarray | None = None) -> float:
    """Mean cross-entropy on the fixed held-out windows (``train_cfg.eval_batches`` batches), MoE
    layers ``dropless``; with ``quantize`` every linear/expert weight is INT4 group-32."""
    if valid_tokens is None:
        _, valid_tokens, _ = load_tokens(data_cfg)
    graphdef, params, rest = _split(model)
    return _evaluator(graphdef, train_cfg, data_cfg, valid_tokens, quantize)(params, rest)


def _qat_step(graphdef, kw, state, inputs, targets):
    """One AdamW step of the float latent weights on the loss of their INT4 fake quantization."""
    model, opt = nnx.merge(graphdef, state)
    model_def, params, rest = _split(model)
    grad_fn = jax.value_and_grad(partial(_forward_loss, model_def, kw, True), has_aux=True)
    (_, metrics), grads = grad_fn(params, rest, inputs, targets)
    metrics["grad_norm"] = optax.tree.norm(grads)
    opt.update(model, grads)
    return nnx.state((model, opt)), metrics


def qat(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, init: Any, *,
        ckpt_dir: str | os.PathLike | None = None, stop_at_step: int | None = None,
        on_log: Callable[[dict], None] | None = None, events_dir: str | os.PathLike | None = None) -> QATResult:
    """Quantization-aware training of ``init`` (see :func:`initial_model`) for
    ``train_cfg.tokens`` tokens; batches are drawn from ``(train_cfg.seed, step)`` like ``train()``.
    Evaluated (INT4) at step 0, every ``eval_every`` steps and at the end. With ``ckpt_dir`` it
    checkpoints the ``(model, optimizer)`` state every ``ckpt_every`` steps and resumes bit-exactly
    (:func:`moe_scaling.train.loop.resume_and_train`); ``stop_at_step`` stops as if interrupted.
    ``events_dir``: TensorBoard scalars like pre-training's (``eval/loss`` is the INT4 model's)."""
    check_quantizable(model_cfg, GROUP)
    t0 = time.perf_counter()
    model = initial_model(model_cfg, train_cfg, data_cfg, init)
    train_tokens, valid_tokens, corpus_hash = load_tokens(data_cfg)
    seq, batch = data_cfg.seq_len, train_cfg.batch_size
    steps = train_cfg.steps(seq)
    model_def, params, rest = _split(model)
    init_f32 = _evaluator(model_def, train_cfg, data_cfg, valid_tokens, False)(params, rest)
    int4 = _evaluator(model_def, train_cfg, data_cfg, valid_tokens, True)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, make_optimizer(train_cfg, steps), wrt=nnx.Param)))
    kw = dict(dispatch=resolve_dispatch(train_cfg.dispatch), capacity_factor=train_cfg.capacity_factor,
              dtype=_dtype(train_cfg.dtype), aux_loss_coef=train_cfg.aux_loss_coef,
              z_loss_coef=train_cfg.z_loss_coef)
    step = jax.jit(partial(_qat_step, graphdef, kw), donate_argnums=0)

    def eval_int4(state) -> float:
        return int4(*_split(nnx.merge(graphdef, state)[0])[1:])

    result, state = resume_and_train(
        state, ckpt_dir=ckpt_dir, configs=run_configs(model_cfg, train_cfg, data_cfg), corpus_hash=corpus_hash,
        data_cfg=data_cfg, train_cfg=train_cfg, steps=steps, stop_at_step=stop_at_step,
        train_step=compile_for(step), batch_at=lambda s: train_batch(train_tokens, batch, seq, train_cfg.seed, s),
        eval_loss=eval_int4, on_log=on_log, t_call=t0, metrics={"initial_eval_loss_f32": init_f32},
        events_dir=events_dir)
    result.metrics["initial_eval_loss_int4"] = result.curve[0]["eval_loss"]
    return QATResult(model=nnx.merge(graphdef, state)[0], steps=result.steps, initial_eval_loss=init_f32,
                     initial_ptq_loss=result.curve[0]["eval_loss"], final_eval_loss=result.final_eval_loss,
                     curve=result.curve, wall_s=time.perf_counter() - t0, result=result)
