"""The train step: learning-rate schedules, the AdamW optimiser, the loss, the initial state, the
auxiliary-loss-free router-bias update and the jitted train and eval steps.

* The model and optimiser are split once into ``(graphdef, state)`` and the train step is a
  plain :func:`jax.jit` over ``state`` with its buffers donated (docs/design.md, section 7).
* Loss = mean next-token cross-entropy + ``aux_loss_coef`` x Switch balance loss +
  ``z_loss_coef`` x router z-loss (both averaged over the MoE layers).
* Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 report sec 2.1.2): in MoE layers
  with a router bias (``model.router_bias``) each expert's selection bias moves by
  ``bias_update_rate`` after every optimiser step, up if the expert received fewer tokens than
  the mean in that step's batch, down if more (:func:`balance_bias_update`). It runs inside the
  jitted step; the bias gets no gradient and AdamW never sees it. Other models compile to the
  same step as without it.

The loop that drives these steps is :mod:`moe_scaling.train.loop`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_scaling.config import ModelConfig, TrainConfig
from moe_scaling.model.transformer import Transformer

__all__ = ["lr_schedule", "make_optimizer", "warmup_steps", "loss_fn", "init_state", "apply_step", "make_train_step",
           "make_eval_step", "balance_bias_update"]


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
            z_loss_coef: float = 0.0, masked: bool = False, mesh=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics (``loss`` = mean cross-entropy, MoE ``aux_loss``, ``z_loss``,
    ``dropped_fraction``, ``expert_load``).

    ``masked``: targets ``< 0`` are not trained, and ``loss = sum_{t: y_t >= 0} -log p(y_t) / #{t: y_t >= 0}``
    (instruction tuning's assistant-only loss, :mod:`moe_scaling.train.sft`); the default path is
    the plain mean, unchanged. ``mesh``: the step's device mesh, for the MoE layers' token-local
    dispatch (None on one device)."""
    logits, aux = model(inputs, dispatch=dispatch, capacity_factor=capacity_factor, dtype=dtype, mesh=mesh)
    if masked:
        y = targets.reshape(-1)
        keep = y >= 0
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, y, 0))
        ce = jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
    else:
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


def apply_step(model: Transformer, opt: nnx.Optimizer, kw: dict, bias_update_rate: float,
               inputs: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """One AdamW step of ``model`` in place (then the router-bias update); returns the metrics.
    Shared by the single-run step and the group step (:mod:`moe_scaling.train.group`)."""
    (_, metrics), grads = nnx.value_and_grad(partial(loss_fn, **kw), has_aux=True)(model, inputs, targets)
    metrics["grad_norm"] = optax.tree.norm(grads)
    opt.update(model, grads)
    if bias_update_rate > 0:
        _update_router_biases(model, metrics["expert_load"], inputs.size, bias_update_rate)
    return metrics


def _train_step(graphdef, kw, bias_update_rate, state, inputs, targets):
    model, opt = nnx.merge(graphdef, state)
    metrics = apply_step(model, opt, kw, bias_update_rate, inputs, targets)
    return nnx.state((model, opt)), metrics


def _eval_step(graphdef, kw, state, inputs, targets):
    model, _ = nnx.merge(graphdef, state)
    _, metrics = loss_fn(model, inputs, targets, **kw)
    return metrics["loss"]


def _shardings(placement, out_state: bool) -> dict:
    """``jax.jit`` sharding arguments on a mesh (:class:`moe_scaling.train.mesh.Placement`); none
    without one, so the single-device step is compiled exactly as before."""
    if placement is None:
        return {}
    ins = (placement.state, placement.batch, placement.batch)
    outs = (placement.state, placement.replicated) if out_state else placement.replicated
    return {"in_shardings": ins, "out_shardings": outs}


def make_train_step(graphdef, train_cfg: TrainConfig, dispatch: str, placement=None, masked: bool = False):
    """``step(state, inputs, targets) -> (state, metrics)``, jitted, ``state`` donated: one AdamW
    step, then the router-bias balancing update (``train_cfg.bias_update_rate``). With a
    ``placement`` (:class:`moe_scaling.train.mesh.Placement`) the step is compiled for its mesh:
    state and batch sharded as it says, metrics replicated."""
    kw = dict(dispatch=dispatch, capacity_factor=train_cfg.capacity_factor,
              dtype=_dtype(train_cfg.dtype), aux_loss_coef=train_cfg.aux_loss_coef,
              z_loss_coef=train_cfg.z_loss_coef, **({"masked": True} if masked else {}),
              mesh=None if placement is None else placement.mesh)
    return jax.jit(partial(_train_step, graphdef, kw, train_cfg.bias_update_rate), donate_argnums=0,
                   **_shardings(placement, out_state=True))


def make_eval_step(graphdef, train_cfg: TrainConfig, dispatch: str, placement=None, masked: bool = False):
    """``eval(state, inputs, targets) -> mean cross-entropy``, jitted (on ``placement``'s mesh
    when given; over the targets ``>= 0`` with ``masked``)."""
    kw = dict(dispatch=dispatch, capacity_factor=train_cfg.capacity_factor,
              dtype=_dtype(train_cfg.dtype), **({"masked": True} if masked else {}),
              mesh=None if placement is None else placement.mesh)
    return jax.jit(partial(_eval_step, graphdef, kw), **_shardings(placement, out_state=False))
