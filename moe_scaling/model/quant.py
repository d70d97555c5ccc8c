"""INT4 weight fake quantization (symmetric, groups of 32 along the input axis, fp16 scales).

This is the on-device weight format the cost model counts as 4.5 bits per weight
(:mod:`moe_scaling.costs`) and the one our on-device export stores (:mod:`moe_scaling.ondevice.onnx_graph`:
ONNX Runtime's ``MatMulNBits``/``QMoE`` operands): for every group of ``g = 32`` consecutive weights
along a matrix's *input* (contraction) axis,

    scale = fp16(max|w| / 7.5)          (a zero group gets the smallest normal fp16 scale)
    q     = clip(round_half_even(w / scale), -8, 7)        (int4)
    w_hat = q * scale

which is torchao's symmetric ``MappingType.SYMMETRIC`` int4 scheme with ``scale_dtype=float16``
(``torchao.quantization.quant_primitives.choose_qparams_affine``; checked bit for bit against
ExecuTorch 1.5.1 during development). The ONNX export packs exactly these codes and scales
(``tests/test_ondevice.py`` unpacks them and compares bit for bit), so the runtime multiplies by the
weights QAT trained against.

:func:`fake_quant_params` applies it to every linear and expert weight of a :class:`Transformer`
state (attention q/k/v/o, dense and shared SwiGLUs, routed experts) with a straight-through
estimator: the forward pass sees ``w_hat``, the gradient passes to the float ``w`` unchanged.
Embeddings (and an untied LM head), the router, the shared-expert gates and the norm gains stay in
float, as the cost model counts them.

Why by hand and not qwix or aqt (both evaluated, neither adopted):

* qwix (google/qwix, the maintained successor of aqt) quantizes by *intercepting the ops* a module
  calls (``dot_general``/``einsum``) and matching module paths. Our MoE dispatch runs its expert
  products inside custom-VJP gather/scatter helpers (``model/routing.py``) and the dense FFN
  stores ``w_down`` output-major, so the contraction axis (the group axis) differs per op; qwix
  would quantize the *gathered* ``[E, C, d]`` operands per call and per dispatch method, and its
  scales are float32, not the fp16 scales the runtime stores, so it would not be bit-identical to
  the exported weights. It would also be a new core dependency for ~40 lines of arithmetic.
* aqt (google/aqt) is in maintenance mode (its README points to qwix) and has the same
  op-interception design.
* Quantizing the *parameters* once per step (this module) is independent of the dispatch method,
  costs one elementwise pass over the weights, and makes the forward weights exactly the
  runtime's int4 weights.

Int8 dynamic activations: :func:`fake_quant_act_int8` is XNNPACK's per-token asymmetric scheme
(``qd8``), tested on its own and not applied by QAT. The runtime we export to quantizes activations
to int8 on the fly in blocks along the contraction axis (MatMulNBits/QMoE ``accuracy_level=4``, MLAS's
int8 compute path), finer-grained than per token; on a trained model its held-out loss equals the float-
activation INT4 model's within 0.005 nats (measured equal to 4 decimals, ``tests/test_ondevice.py``),
so stage 4 trains the weights only: simulating the activations would cost a hook in every matmul of
``model/transformer.py`` and ``model/routing.py`` for no measurable gain.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError

__all__ = ["GROUP", "quantize_int4", "dequantize_int4", "fake_quant_int4", "fake_quant_act_int8",
           "quantized_weights", "fake_quant_params", "check_quantizable"]

GROUP = 32
QMIN, QMAX = -8, 7
_FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal fp16: the scale of an all-zero group


def _grouped(w: jax.Array, axis: int, group: int) -> tuple[jax.Array, tuple[int, ...]]:
    """``w`` with ``axis`` moved last and split into ``[..., n_groups, group]``."""
    axis = axis % w.ndim
    moved = jnp.moveaxis(w, axis, -1)
    n = moved.shape[-1]
    if n % group:
        raise ConfigError(f"int4 quantization: an input axis of {n} is not a multiple of the group size {group}")
    return moved.reshape(*moved.shape[:-1], n // group, group), moved.shape


def quantize_int4(w: jax.Array, axis: int = 0, group: int = GROUP) -> tuple[jax.Array, jax.Array]:
    """``(q int8 [..., n_groups, group] in [-8, 7], scales float16 [..., n_groups, 1])`` of ``w``
    grouped along ``axis`` (moved last). See the module docstring for the formula."""
    g, _ = _grouped(jnp.asarray(w, jnp.float32), axis, group)
    amax = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
    scale = jnp.maximum(amax / ((QMAX - QMIN) / 2), _FP16_TINY).astype(jnp.float16)
    q = jnp.clip(jnp.round(g / scale.astype(jnp.float32)), QMIN, QMAX).astype(jnp.int8)
    return q, scale


def dequantize_int4(q: jax.Array, scale: jax.Array, shape: tuple[int, ...], axis: int = 0) -> jax.Array:
    """Float32 weights of ``shape`` from :func:`quantize_int4`'s ``(q, scale)`` along ``axis``."""
    axis = axis % len(shape)
    moved_shape = tuple(np.moveaxis(np.empty(shape, np.int8), axis, -1).shape)
    w = (q.astype(jnp.float32) * scale.astype(jnp.float32)).reshape(moved_shape)
    return jnp.moveaxis(w, -1, axis)


def _fake_quant(w: jax.Array, axis: int, group: int) -> jax.Array:
    q, scale = quantize_int4(w, axis, group)
    return dequantize_int4(q, scale, w.shape, axis).astype(w.dtype)


def fake_quant_int4(w: jax.Array, axis: int = 0, group: int = GROUP) -> jax.Array:
    """``w_hat`` (same shape and dtype as ``w``) with a straight-through gradient:
    ``d w_hat / d w = 1``."""
    return w + jax.lax.stop_gradient(_fake_quant(w, axis, group) - w)


def fake_quant_act_int8(x: jax.Array) -> jax.Array:
    """Per-token (last axis) asymmetric dynamic int8 fake quantization with a straight-through
    gradient (torchao's dynamic activation scheme: ``scale = (max - min) / 255`` over the token,
    range widened to include 0, zero point ``round(-128 - min / scale)``)."""
    xf = x.astype(jnp.float32)
    lo = jnp.minimum(jnp.min(xf, axis=-1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(xf, axis=-1, keepdims=True), 0.0)
    scale = jnp.maximum((hi - lo) / 255.0, jnp.finfo(jnp.float32).eps)
    zp = jnp.clip(jnp.round(-128.0 - lo / scale), -128, 127)
    q = jnp.clip(jnp.round(xf / scale) + zp, -128, 127)
    xq = ((q - zp) * scale).astype(x.dtype)
    return x + jax.lax.stop_gradient(xq - x)


# --------------------------------------------------------------------------------------
# Which parameters, and along which axis
# --------------------------------------------------------------------------------------

# (key path suffix, ndim) -> input (contraction) axis. DenseFFN/shared w_down is stored
# output-major [d, width] (transformer.py), so its input axis is 1; experts' w_down is [E, f, d].
_AXES = {("wqkv", 2): 0, ("wo", 2): 0, ("w_gate_up", 2): 0, ("w_down", 2): 1,
         ("w_gate_up", 3): 1, ("w_down", 3): 1}


def _key(path) -> str:
    """The parameter's name: the last path entry that is not an ``nnx.Variable``'s ``value``."""
    for entry in reversed(path):
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                name = str(getattr(entry, attr))
                if name not in ("value", "raw_value"):
                    return name
                break
    return ""


def quantized_weights(params: Any) -> list[tuple[str, int]]:
    """``[(keystr, input axis)]`` of every weight :func:`fake_quant_params` quantizes."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        axis = _AXES.get((_key(path), np.ndim(leaf)))
        if axis is not None:
            out.append((jax.tree_util.keystr(path), axis))
    return out


def fake_quant_params(params: Any, group: int = GROUP) -> Any:
    """``params`` (an ``nnx.State`` or nested dict of a :class:`Transformer`) with every linear and
    expert weight replaced by its straight-through INT4 fake quantization; other leaves unchanged."""
    def fq(path, leaf):
        axis = _AXES.get((_key(path), np.ndim(leaf)))
        return leaf if axis is None else fake_quant_int4(leaf, axis, group)
    return jax.tree_util.tree_map_with_path(fq, params)


def check_quantizable(cfg: ModelConfig, group: int = GROUP) -> None:
    """Raise :class:`ConfigError` (one line) unless every input axis is a multiple of ``group``."""
    dims = {"d_model": cfg.d_model, "n_heads * head_dim": cfg.n_heads * cfg.head_dim, "d_ff": cfg.d_ff}
    if cfg.is_moe:
        dims["d_expert"] = cfg.d_expert
        if cfg.n_shared:
            dims["n_shared * d_shared"] = cfg.n_shared * cfg.d_shared
    for name, n in dims.items():
        if n % group:
            raise ConfigError(f"model.{name.split(' ')[0]} = {n}: INT4 groups of {group} need a multiple of "
                              f"{group}; pick a width divisible by {group}")
