"""Training: AdamW with warmup + cosine/WSD schedules, periodic eval, exact resume, divergence.

:func:`train` runs one configuration to its token budget and returns a :class:`TrainResult`.

* The model and optimiser are split once into ``(graphdef, state)`` and the train step is a
  plain :func:`jax.jit` over ``state`` with its buffers donated (DESIGN.md section 7), compiled
  ahead of time so ``step_time_s`` counts only the steps.
* Loss = mean next-token cross-entropy + ``aux_loss_coef`` x Switch balance loss +
  ``z_loss_coef`` x router z-loss (both averaged over the MoE layers). ``train_loss`` in the
  curve is the cross-entropy alone.
* Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 report sec 2.1.2): in MoE layers
  with a router bias (``model.router_bias``) each expert's selection bias moves by
  ``bias_update_rate`` after every optimiser step, up if the expert received fewer tokens than
  the mean in that step's batch, down if more (:func:`balance_bias_update`). It runs inside the
  jitted step; the bias gets no gradient and AdamW never sees it. Other models compile to the
  same step as without it.
* Eval: mean cross-entropy over a fixed held-out set (``eval_batches`` batches of evenly spaced
  validation windows, :func:`moe_scaling.train.data.eval_windows`) at step 0, every ``eval_every``
  steps and at the end; MoE layers evaluate ``dropless`` when training uses ``capacity``, so no
  eval token is ever dropped.
* Checkpoints (orbax) every ``ckpt_every`` steps and at the end hold the model, the optimiser
  state (with its step count) and a JSON record (step, curve so far, metrics, configs). The data
  position is the step itself: batch ``s`` is drawn from ``(seed, s)``
  (:func:`moe_scaling.train.data.train_batch`), so a resumed run is bit-identical to a straight one.
* A non-finite loss ends the run with status ``diverged`` (the step and the last good loss);
  no checkpoint of non-finite parameters is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_scaling.files import finite_or_none
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.train.data import eval_windows, load_tokens, tokenizer_vocab_size, train_batch
from moe_scaling.model.transformer import Transformer
from moe_scaling.model.routing import resolve_dispatch

__all__ = ["TrainResult", "train", "load_checkpoint", "lr_schedule", "make_optimizer", "warmup_steps", "loss_fn",
           "init_state", "make_train_step", "make_eval_step", "balance_bias_update"]


@dataclass
class TrainResult:
    """The outcome of :func:`train` (one row of a sweep's results table)."""

    status: str                    # "completed" | "diverged" | "stopped" (stop_at_step reached)
    steps: int                     # optimiser steps done in total (incl. before a resume)
    tokens: int                    # training tokens seen in total
    final_eval_loss: float | None  # mean loss on the fixed held-out eval set at the end
    best_eval_loss: float | None
    final_train_loss: float | None
    diverged_step: int | None      # step at which NaN/inf appeared
    last_good_loss: float | None
    wall_s: float                  # wall time of this call
    step_time_s: float             # time inside the jitted train steps in this call
    tokens_per_s: float            # tokens trained in this call / step_time_s
    curve: list[dict] = field(default_factory=list)
    corpus_hash: str = ""
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------


def warmup_steps(train_cfg: TrainConfig, steps: int) -> int:
    """``warmup`` as a step count: a fraction of ``steps`` when < 1, else the number itself."""
    w = train_cfg.warmup
    return min(steps, int(round(w * steps)) if w < 1 else int(w))


def lr_schedule(train_cfg: TrainConfig, steps: int) -> Callable[[jax.Array], jax.Array]:
    """Learning rate at optimiser step ``t`` (0-based).

    Linear warmup ``lr * (t + 1) / warmup`` then: ``cosine`` from ``lr`` to ``min_lr_ratio * lr``
    at the last step; ``wsd`` constant ``lr`` then linear decay to ``min_lr_ratio * lr`` over the
    last ``decay_fraction`` of the steps; ``constant``.
    """
    lr, lo = train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio
    warm = warmup_steps(train_cfg, steps)
    decay_start = steps - int(round(train_cfg.decay_fraction * steps))
    kind = train_cfg.schedule

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        ramp = jnp.minimum(1.0, (t + 1.0) / max(warm, 1)) if warm else 1.0
        if kind == "cosine":
            frac = jnp.clip((t - warm) / max(steps - 1 - warm, 1), 0.0, 1.0)
            after = lo + (lr - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif kind == "wsd":
            frac = jnp.clip((t - decay_start + 1.0) / max(steps - decay_start, 1), 0.0, 1.0)
            after = lr + (lo - lr) * frac
        else:
            after = jnp.asarray(lr, jnp.float32)
        return jnp.where(t < warm, lr * ramp, after)

    return schedule


def make_optimizer(train_cfg: TrainConfig, steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if ``grad_clip`` > 0) then AdamW; weight decay on matrices only."""
    adamw = optax.adamw(lr_schedule(train_cfg, steps), b1=train_cfg.beta1, b2=train_cfg.beta2,
                        eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if train_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
    return adamw


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def loss_fn(model: Transformer, inputs: jax.Array, targets: jax.Array, *, dispatch: str,
            capacity_factor: float, dtype, aux_loss_coef: float = 0.0,
            z_loss_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics (``loss`` = mean cross-entropy, MoE ``aux_loss``, ``z_loss``,
    ``dropped_fraction``, ``expert_load``)."""
    logits, aux = model(inputs, dispatch=dispatch, capacity_factor=capacity_factor, dtype=dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1)).mean()
    total = ce + aux_loss_coef * aux["aux_loss"] + z_loss_coef * aux["z_loss"]
    return total, {"loss": ce, "total_loss": total, **aux}


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, steps: int):
    """``(graphdef, state)`` of the freshly initialised ``(model, optimizer)`` pair."""
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=train_cfg.seed))
    opt = nnx.Optimizer(model, make_optimizer(train_cfg, steps), wrt=nnx.Param)
    return nnx.split((model, opt))


def balance_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """One auxiliary-loss-free balancing step: ``bias + rate * sign(mean(load) - load)``.

    ``load [..., E]`` is how many tokens each expert received (any non-negative measure; the
    sign is computed as ``sign(sum(load) - E * load)``, so integer counts compare exactly and an
    expert at exactly the mean load keeps its bias). Overloaded experts go down by ``rate``,
    underloaded ones up; the changes sum to zero when as many experts are above the mean as
    below it.
    """
    diff = jnp.sum(load, axis=-1, keepdims=True) - load.shape[-1] * load
    return bias + jnp.asarray(rate, bias.dtype) * jnp.sign(diff).astype(bias.dtype)


def _update_router_biases(model: Transformer, expert_load: jax.Array, n_tokens: int,
                          rate: float) -> None:
    """Apply :func:`balance_bias_update` to every MoE layer that has a router bias, from that
    layer's row of ``expert_load [n_moe_layers, E]`` (fractions of the ``n_tokens * top_k``
    assignments, turned back into exact counts)."""
    moe_layers = [block.ffn for block in model.blocks if block.is_moe]
    for moe, load in zip(moe_layers, expert_load):
        if moe.router_bias is not None:
            counts = jnp.round(load * (n_tokens * moe.top_k)).astype(jnp.int32)
            moe.router_bias[...] = balance_bias_update(moe.router_bias[...], counts, rate)


def _train_step(graphdef, kw, bias_update_rate, state, inputs, targets):
    model, opt = nnx.merge(graphdef, state)
    (_, metrics), grads = nnx.value_and_grad(partial(loss_fn, **kw), has_aux=True)(model, inputs, targets)
    metrics["grad_norm"] = optax.tree.norm(grads)
    opt.update(model, grads)
    if bias_update_rate > 0:
        _update_router_biases(model, metrics["expert_load"], inputs.size, bias_update_rate)
    return nnx.state((model, opt)), metrics


def _eval_step(graphdef, kw, state, inputs, targets):
    model, _ = nnx.merge(graphdef, state)
    _, metrics = loss_fn(model, inputs, targets, **kw)
    return metrics["loss"]


def make_train_step(graphdef, train_cfg: TrainConfig, dispatch: str):
    """``step(state, inputs, targets) -> (state, metrics)``, jitted, ``state`` donated: one AdamW
    step, then the router-bias balancing update (``train_cfg.bias_update_rate``)."""
    kw = dict(dispatch=dispatch, capacity_factor=train_cfg.capacity_factor,
              dtype=_dtype(train_cfg.dtype), aux_loss_coef=train_cfg.aux_loss_coef,
              z_loss_coef=train_cfg.z_loss_coef)
    return jax.jit(partial(_train_step, graphdef, kw, train_cfg.bias_update_rate), donate_argnums=0)


def make_eval_step(graphdef, train_cfg: TrainConfig, dispatch: str):
    """``eval(state, inputs, targets) -> mean cross-entropy``, jitted."""
    kw = dict(dispatch=dispatch, capacity_factor=train_cfg.capacity_factor,
              dtype=_dtype(train_cfg.dtype))
    return jax.jit(partial(_eval_step, graphdef, kw))


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


class _Checkpoints:
    """orbax checkpoints of the train state plus a JSON record of the run so far."""

    def __init__(self, directory: str | os.PathLike):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.mngr = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        ocp = self.ocp
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
            record=ocp.args.JsonSave(finite_or_none(record))), force=True)
        self.mngr.wait_until_finished()

    def restore(self, step: int, state):
        ocp = self.ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
        got = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        nnx.replace_by_pure_dict(state, got["state"])
        return state, got["record"]

    def close(self) -> None:
        self.mngr.close()


def _nan_if_none(v) -> float:
    return float("nan") if v is None else float(v)


def load_checkpoint(ckpt_dir: str | os.PathLike, model_cfg: ModelConfig, train_cfg: TrainConfig,
                    data_cfg: DataConfig, *, step: int | None = None) -> tuple[Transformer, dict]:
    """The model saved by :func:`train` in ``ckpt_dir`` (latest step, or ``step``) and the run's
    JSON record (``step``, ``status``, ``curve``, ``metrics``, ``configs``, ...)."""
    if not Path(ckpt_dir).is_dir():
        raise ConfigError(f"ckpt_dir = {str(ckpt_dir)!r}: no such directory; train first")
    ckpt = _Checkpoints(ckpt_dir)
    try:
        step = ckpt.latest() if step is None else step
        if step is None:
            raise ConfigError(f"ckpt_dir = {str(ckpt_dir)!r}: holds no checkpoint; train first")
        graphdef, state = init_state(model_cfg, train_cfg, train_cfg.steps(data_cfg.seq_len))
        state, record = ckpt.restore(step, state)
    finally:
        ckpt.close()
    model, _ = nnx.merge(graphdef, state)
    return model, record


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _check_compatible(model_cfg: ModelConfig, data_cfg: DataConfig, train_tokens, valid_tokens):
    top = int(max(train_tokens.max(initial=0), valid_tokens.max(initial=0)))
    if model_cfg.vocab_size <= top:
        raise ConfigError(f"model.vocab_size = {model_cfg.vocab_size}: the corpus holds token id "
                          f"{top}; set vocab_size >= {max(top + 1, tokenizer_vocab_size(data_cfg.tokenizer))}")
    if data_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len = {data_cfg.seq_len}: longer than model.max_seq_len "
                          f"({model_cfg.max_seq_len}); shorten seq_len or raise max_seq_len")


def _configs(model_cfg, train_cfg, data_cfg) -> dict:
    return {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "data": data_cfg.to_dict()}


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, *,
          ckpt_dir: str | os.PathLike | None = None,
          progress: bool = True,
          on_log: Callable[[dict], None] | None = None,
          stop_at_step: int | None = None,
          ) -> TrainResult:
    """Train ``model_cfg`` on ``data_cfg`` for ``train_cfg.tokens`` tokens.

    Args:
      ckpt_dir: orbax checkpoints every ``train_cfg.ckpt_every`` steps and at the end; when it
        already holds a checkpoint of the same configs, training resumes from it bit-exactly
        (a finished run returns its recorded result without training). A checkpoint of other
        configs raises :class:`ConfigError`.
      progress: show a tqdm bar (step, loss, tokens/s, ETA) on stderr.
      on_log: called every ``log_every`` steps with ``{"step", "steps", "tokens", "train_loss",
        "tokens_per_s", "aux_loss", "dropped_fraction"}`` and after every eval with
        ``{"step", "steps", "tokens", "eval_loss"}``.
      stop_at_step: stop (status ``stopped``, checkpoint written) once this many steps are done,
        as if interrupted; the schedule still follows the full budget.

    Returns:
      A :class:`TrainResult`; a NaN/inf loss gives status ``diverged`` (never an exception).
    """
    t_call = time.perf_counter()
    train_tokens, valid_tokens, corpus_hash = load_tokens(data_cfg)
    _check_compatible(model_cfg, data_cfg, train_tokens, valid_tokens)
    seq, batch = data_cfg.seq_len, train_cfg.batch_size
    steps = train_cfg.steps(seq)
    per_step = batch * seq
    end_step = steps if stop_at_step is None else max(0, min(steps, int(stop_at_step)))
    dispatch = resolve_dispatch(train_cfg.dispatch)
    eval_dispatch = "dropless" if dispatch == "capacity" else dispatch
    configs = _configs(model_cfg, train_cfg, data_cfg)

    graphdef, state = init_state(model_cfg, train_cfg, steps)
    eval_set = eval_windows(valid_tokens, batch, seq, train_cfg.eval_batches)

    ckpt = _Checkpoints(ckpt_dir) if ckpt_dir is not None else None
    start, record = 0, None
    if ckpt is not None and ckpt.latest() is not None:
        state, record = ckpt.restore(ckpt.latest(), state)
        if record.get("configs") != finite_or_none(configs):
            ckpt.close()
            raise ConfigError(f"ckpt_dir = {str(ckpt_dir)!r}: holds a checkpoint of different "
                              "configs; use a fresh directory for this run")
        start = int(record["step"])

    curve = [] if record is None else [
        {**row, "train_loss": _nan_if_none(row["train_loss"]), "eval_loss": _nan_if_none(row["eval_loss"])}
        for row in record["curve"]]
    evals = [r["eval_loss"] for r in curve if math.isfinite(r["eval_loss"])]
    best_eval = min(evals) if evals else None
    last_eval = evals[-1] if evals else None
    last_good = (record or {}).get("last_good_loss")
    metrics: dict[str, Any] = dict((record or {}).get("metrics") or {})
    metrics.update(dispatch=dispatch, eval_dispatch=eval_dispatch)

    train_step = make_train_step(graphdef, train_cfg, dispatch)
    eval_step = make_eval_step(graphdef, train_cfg, eval_dispatch)
    timings = {"compile_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0}

    def evaluate(step: int) -> float:
        nonlocal best_eval, last_eval
        t0 = time.perf_counter()
        loss = float(np.mean([float(eval_step(state, x, y)) for x, y in eval_set]))
        timings["eval_s"] += time.perf_counter() - t0
        last_eval = loss
        if math.isfinite(loss):
            best_eval = loss if best_eval is None else min(best_eval, loss)
        if on_log is not None:
            on_log({"step": step, "steps": steps, "tokens": step * per_step, "eval_loss": loss})
        return loss

    def save(step: int, status: str) -> None:
        if ckpt is None:
            return
        t0 = time.perf_counter()
        ckpt.save(step, state, {"step": step, "status": status, "configs": configs,
                                "corpus_hash": corpus_hash, "curve": curve,
                                "last_good_loss": last_good, "window_losses": window,
                                "metrics": metrics})
        timings["ckpt_s"] += time.perf_counter() - t0

    if start == 0 and not curve:
        curve.append({"step": 0, "tokens": 0, "train_loss": float("nan"), "eval_loss": evaluate(0)})

    status, diverged_step = "completed", None
    step_time = 0.0
    # Losses of the steps since the last curve row (persisted, so a resume between rows
    # averages the same steps) and their MoE statistics (for ``metrics``).
    window = [float(v) for v in (record or {}).get("window_losses") or []]
    window_stats: list[dict] = []
    bar = None
    if start < end_step:
        x, y = train_batch(train_tokens, batch, seq, train_cfg.seed, start)
        t0 = time.perf_counter()
        compiled = train_step.lower(state, x, y).compile()
        timings["compile_s"] = time.perf_counter() - t0
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=end_step, initial=start, desc="train", unit="step", dynamic_ncols=True)
    for s in range(start, end_step):
        t0 = time.perf_counter()
        state, m = compiled(state, x, y)
        if s + 1 < end_step:  # prepare the next batch while the step runs
            x, y = train_batch(train_tokens, batch, seq, train_cfg.seed, s + 1)
        m = jax.device_get(m)
        step_time += time.perf_counter() - t0
        step = s + 1
        loss = float(m["loss"])
        if not (math.isfinite(loss) and math.isfinite(float(m["total_loss"]))):
            status, diverged_step = "diverged", step
            curve.append({"step": step, "tokens": step * per_step, "train_loss": loss,
                          "eval_loss": float("nan")})
            break
        last_good = loss
        window.append(loss)
        window_stats.append(m)
        log_now = step % train_cfg.log_every == 0
        eval_now = step % train_cfg.eval_every == 0 or step == steps
        if log_now or eval_now:
            train_loss = float(np.mean(window))
            if window_stats:
                metrics.update(_window_metrics(window_stats))
            window, window_stats = [], []
            tps = (step - start) * per_step / max(step_time, 1e-9)
            row = {"step": step, "tokens": step * per_step, "train_loss": train_loss,
                   "eval_loss": evaluate(step) if eval_now else float("nan")}
            curve.append(row)
            if on_log is not None:
                on_log({"step": step, "steps": steps, "tokens": step * per_step,
                        "train_loss": train_loss, "tokens_per_s": tps,
                        "aux_loss": metrics.get("aux_loss"),
                        "dropped_fraction": metrics.get("dropped_fraction")})
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if step % train_cfg.ckpt_every == 0 and step < end_step:
            save(step, "running")
    if bar is not None:
        bar.close()

    if status == "diverged":
        done = diverged_step
    else:
        done = max(start, end_step)
        if done < steps:
            status = "stopped"
        elif done == start and record is not None:
            status = record.get("status", status)
        if done > start:
            save(done, status)
    if ckpt is not None:
        ckpt.close()

    trained = (done - start) * per_step
    train_rows = [r["train_loss"] for r in curve if math.isfinite(r["train_loss"])]
    metrics.update(timings)
    return TrainResult(
        status=status, steps=done, tokens=done * per_step,
        final_eval_loss=last_eval, best_eval_loss=best_eval,
        final_train_loss=train_rows[-1] if train_rows else None,
        diverged_step=diverged_step, last_good_loss=last_good,
        wall_s=time.perf_counter() - t_call, step_time_s=step_time,
        tokens_per_s=trained / step_time if step_time > 0 else 0.0,
        curve=curve, corpus_hash=corpus_hash, metrics=metrics)


def _window_metrics(window: list[dict]) -> dict[str, Any]:
    """MoE metrics averaged over the steps of a logging window."""
    load = np.mean([w["expert_load"] for w in window], axis=0)  # [n_moe_layers, E]
    out = {name: float(np.mean([w[name] for w in window]))
           for name in ("aux_loss", "z_loss", "dropped_fraction", "grad_norm")}
    if load.size and load.shape[0]:
        out["expert_load"] = [float(v) for v in load.mean(axis=0)]
        out["expert_load_per_layer"] = [[float(v) for v in row] for row in load]
        out["load_imbalance"] = float(load.max(axis=1).mean() * load.shape[1])
    return out
