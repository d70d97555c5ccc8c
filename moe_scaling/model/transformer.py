"""The MobileMoE-style decoder in Flax NNX (docs/design.md, section 2).

Pre-norm blocks: ``x + Attention(RMSNorm(x))`` then ``x + FFN(RMSNorm(x))``. Attention is
grouped-query with RoPE (rotate-half convention, as in Hugging Face Llama/Qwen) and optional
QK-norm (an RMSNorm over each head's ``head_dim``). The FFN of a layer is a dense SwiGLU of width
``d_ff`` or, for the layers after the first ``n_dense_layers`` of an MoE config, an
:class:`MoE` block: a router over ``n_experts`` SwiGLU experts of width ``d_expert``, top-k,
plus ``n_shared`` always-on shared experts of width ``d_shared`` (optionally sigmoid-gated).
Input and output embeddings are tied unless ``tie_embeddings`` is false.

Activations stay flat as ``(batch * seq, d_model)`` through every projection and FFN (XLA's CPU
backward of 2-D matmuls is much faster than of 3-D ones, docs/design.md, section 7). Gate and up
projections are fused into one ``[d, 2 f]`` matrix (gate first, then up).

Parameters are float32; ``dtype`` sets the compute dtype of the matmuls. The router, norms,
softmaxes and the logits are always computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_scaling.config import ModelConfig
from moe_scaling.model.routing import (expert_load, load_balance_loss, moe_experts, moe_experts_sharded,
                                       route, route_sharded, router_z_loss, swiglu)

__all__ = ["Transformer", "RMSNorm", "Attention", "DenseFFN", "MoE", "Block", "RouterBias",
           "rope_tables", "apply_rope"]

INIT_STD = 0.02


class RouterBias(nnx.Variable):
    """Per-expert selection bias of a sigmoid router (a buffer: not trained by the optimiser)."""


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _mm(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables ``[seq_len, head_dim]`` for rotate-half RoPE.

    Computed with NumPy so that under ``jit`` they are constants: XLA would otherwise fuse the
    ``cos``/``sin`` of every position into each consumer and recompute them per element.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.arange(seq_len, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: jax.Array, cos, sin) -> jax.Array:
    """Rotate ``x [B, S, heads, head_dim]`` by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """Softmax attention with a causal mask, ``q [B, kv, g, S, hd]`` (already scaled) over
    ``k, v [B, kv, S, hd]`` -> ``[B, kv, g, S, hd]``.

    The queries are taken in up to 8 blocks of at least 64 rows; block ``i`` attends only to the
    keys ``< (i + 1) * block``, so the fully masked upper blocks of the score matrix are never
    computed (37% less attention work than the full square at 4 blocks, same result). Within a
    block the ``g`` query heads that share a key/value head are stacked as ``g * block`` rows of
    one ``[B, kv]``-batched matmul: a separate size-``g`` axis (size 1 without GQA) turns the
    backward products into slow elementwise reductions on XLA:CPU.
    """
    b, kv, g, seq, hd = q.shape
    n = min(8, max(1, seq // 64))
    if seq % n:
        n = 1
    c = seq // n
    outs = []
    for i in range(n):
        keys = (i + 1) * c
        qi = q[:, :, :, i * c:keys].reshape(b, kv, g * c, hd)
        s = jnp.einsum("bkqd,bksd->bkqs", qi, k[:, :, :keys], preferred_element_type=jnp.float32)
        # row r of the block is query position i * c + r % c (g heads stacked); key j is visible iff
        # j <= that position. Built from iotas inside the program: a mask array would be a constant of
        # g * c * keys floats per block and layer (6 GB for MobileMoE-L at 4,096 tokens).
        row = jax.lax.broadcasted_iota(jnp.int32, (g * c, keys), 0) % c + i * c
        col = jax.lax.broadcasted_iota(jnp.int32, (g * c, keys), 1)
        s = jnp.where(col <= row, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(dtype)
        o = jnp.einsum("bkqs,bksd->bkqd", p, v[:, :, :keys], preferred_element_type=dtype)
        outs.append(o.reshape(b, kv, g, c, hd))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=3)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE and optional QK-norm; fused q/k/v matrix."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
        self.wqkv = nnx.Param(_normal(rngs, (cfg.d_model, (h + 2 * kv) * hd), INIT_STD))
        self.bqkv = nnx.Param(jnp.zeros(((h + 2 * kv) * hd,), jnp.float32)) if cfg.attn_bias else None
        self.wo = nnx.Param(_normal(rngs, (h * hd, cfg.d_model), INIT_STD / math.sqrt(2 * cfg.n_layers)))
        self.q_norm = RMSNorm(hd) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd) if cfg.qk_norm else None

    def __call__(self, x: jax.Array, batch: int, cos: jax.Array, sin: jax.Array, dtype) -> jax.Array:
        h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        seq = x.shape[0] // batch
        qkv = _mm(x, self.wqkv[...], dtype)
        if self.bqkv is not None:
            qkv = qkv + self.bqkv[...].astype(dtype)
        q, k, v = jnp.split(qkv, [h * hd, (h + kv) * hd], axis=-1)
        q = q.reshape(batch, seq, h, hd)
        k = k.reshape(batch, seq, kv, hd)
        v = v.reshape(batch, seq, kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Head-major layouts [B, kv, group, S, hd] keep the [.., S, S] scores contiguous for
        # both matmuls and their transposes in the backward pass.
        q = (q * (1.0 / math.sqrt(hd))).astype(dtype)
        q = q.reshape(batch, seq, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)
        k = k.astype(dtype).transpose(0, 2, 1, 3)
        v = v.astype(dtype).transpose(0, 2, 1, 3)
        o = causal_attention(q, k, v, dtype)
        o = o.transpose(0, 3, 1, 2, 4)
        return _mm(o.reshape(batch * seq, h * hd), self.wo[...], dtype)


class DenseFFN(nnx.Module):
    """SwiGLU ``down(silu(x W_gate) * x W_up)`` with fused ``[d, 2 width]`` gate/up weights and
    the down projection stored output-major, ``w_down [d, width]`` (as a torch ``Linear``): its
    weight gradient ``dy^T h`` then has the long ``width`` axis as output columns, which XLA:CPU
    computes 1.8x faster than ``h^T dy`` with 256-wide outputs (bench/README.md)."""

    def __init__(self, d_model: int, width: int, n_layers: int, *, rngs: nnx.Rngs):
        self.w_gate_up = nnx.Param(_normal(rngs, (d_model, 2 * width), INIT_STD))
        self.w_down = nnx.Param(_normal(rngs, (width, d_model), INIT_STD / math.sqrt(2 * n_layers)).T)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        return self.down(swiglu(_mm(x, self.w_gate_up[...], dtype)), dtype)

    def down(self, h: jax.Array, dtype) -> jax.Array:
        """``h [T, width] -> [T, d]`` through ``w_down``."""
        return jnp.einsum("tf,df->td", h.astype(dtype), self.w_down[...].astype(dtype),
                          preferred_element_type=dtype)


class MoE(nnx.Module):
    """Routed experts (top-k of ``n_experts``) plus ``n_shared`` shared experts, outputs summed.

    Weights: ``router [d, E]``; ``w_gate_up [E, d, 2 d_expert]``, ``w_down [E, d_expert, d]``;
    shared experts fused side by side in one :class:`DenseFFN` ``shared``: ``w_gate_up
    [d, 2 n_shared d_shared]`` (all gates, then all ups), ``w_down [d, n_shared d_shared]``; with ``shared_gate`` each shared expert
    is scaled by ``sigmoid(x @ shared_gate[:, i])``. ``router_bias`` is a :class:`RouterBias`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, e, f = cfg.d_model, cfg.n_experts, cfg.d_expert
        self.n_experts, self.top_k = e, cfg.top_k
        self.router_kind, self.norm_topk = cfg.router, cfg.norm_topk
        self.n_shared, self.d_shared = cfg.n_shared, cfg.d_shared
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        self.router = nnx.Param(_normal(rngs, (d, e), INIT_STD))
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32)) if cfg.router_bias else None
        self.w_gate_up = nnx.Param(_normal(rngs, (e, d, 2 * f), INIT_STD))
        self.w_down = nnx.Param(_normal(rngs, (e, f, d), out_std))
        if cfg.n_shared:
            width = cfg.n_shared * cfg.d_shared
            self.shared = DenseFFN(d, width, cfg.n_layers, rngs=rngs)
            self.shared_gate = nnx.Param(_normal(rngs, (d, cfg.n_shared), INIT_STD)) if cfg.shared_gate else None
        else:
            self.shared = None
            self.shared_gate = None

    def __call__(self, x: jax.Array, dtype, dispatch: str, capacity_factor: float,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = jnp.dot(x.astype(jnp.float32), self.router[...])
        bias = self.router_bias[...] if self.router_bias is not None else None
        if mesh is None:
            r = route(logits, self.top_k, kind=self.router_kind, norm_topk=self.norm_topk, bias=bias)
        else:   # each device selects for its own tokens (XLA would gather them all for top_k)
            r = route_sharded(logits, self.top_k, mesh=mesh, kind=self.router_kind, norm_topk=self.norm_topk,
                              bias=bias)
        if mesh is not None and dispatch == "capacity":   # token-local, rows exchanged over `expert`
            y, dropped = moe_experts_sharded(x, r, self.w_gate_up[...], self.w_down[...], mesh=mesh,
                                             capacity_factor=capacity_factor, dtype=dtype)
        else:
            y, dropped = moe_experts(x, r, self.w_gate_up[...], self.w_down[...], method=dispatch,
                                     capacity_factor=capacity_factor, dtype=dtype)
        if self.shared is not None:
            h = swiglu(_mm(x, self.shared.w_gate_up[...], dtype))
            if self.shared_gate is not None:
                g = jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32), self.shared_gate[...]))
                h = (h.reshape(-1, self.n_shared, self.d_shared) * g[:, :, None].astype(h.dtype)
                     ).reshape(h.shape)
            y = y + self.shared.down(h, dtype)
        stats = {"aux_loss": load_balance_loss(r), "z_loss": router_z_loss(r.logits),
                 "expert_load": expert_load(r.experts, self.n_experts), "dropped_fraction": dropped}
        return y.astype(x.dtype), stats


class Block(nnx.Module):
    """One pre-norm decoder layer: attention then a dense or MoE feed-forward."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.is_moe = cfg.is_moe and layer >= cfg.n_dense_layers
        if self.is_moe:
            self.ffn = MoE(cfg, rngs=rngs)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.n_layers, rngs=rngs)

    def __call__(self, x, batch, cos, sin, dtype, dispatch, capacity_factor, mesh=None):
        x = x + self.attn(self.attn_norm(x), batch, cos, sin, dtype).astype(x.dtype)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h, dtype, dispatch, capacity_factor, mesh)
        else:
            y, stats = self.ffn(h, dtype), None
        return x + y.astype(x.dtype), stats


class Transformer(nnx.Module):
    """Decoder-only language model built from a :class:`ModelConfig`.

    ``model(tokens)`` with ``tokens [B, S]`` int returns ``(logits [B * S, vocab] float32, aux)``
    where ``aux`` holds, averaged over the MoE layers (zeros for a dense model):
    ``aux_loss`` (Switch load balance), ``z_loss`` (router z-loss), ``dropped_fraction``; and
    ``expert_load [n_moe_layers, n_experts]`` (fraction of assignments per expert).

    ``dispatch`` is one of :data:`moe_scaling.model.routing.METHODS` (resolve ``auto`` with
    :func:`moe_scaling.model.routing.resolve_dispatch`); ``dtype`` is the matmul compute dtype.
    ``mesh``: the device mesh the step is compiled for (None on one device); with ``capacity``
    dispatch the MoE layers then route each device's tokens locally
    (:func:`moe_scaling.model.routing.moe_experts_sharded`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.d_model), INIT_STD))
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            _normal(rngs, (cfg.d_model, cfg.vocab_size), INIT_STD))

    def __call__(self, tokens: jax.Array, *, dispatch: str = "reference",
                 capacity_factor: float = 1.25, dtype: Any = jnp.float32,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        batch, seq = tokens.shape
        cos, sin = rope_tables(seq, cfg.head_dim, cfg.rope_theta)
        x = jnp.take(self.embed[...], tokens.reshape(-1), axis=0)
        layer_stats = []
        for block in self.blocks:
            x, stats = block(x, batch, cos, sin, dtype, dispatch, capacity_factor, mesh)
            if stats is not None:
                layer_stats.append(stats)
        x = self.final_norm(x)
        w_out = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.dot(x.astype(dtype), w_out.astype(dtype), preferred_element_type=jnp.float32)
        if layer_stats:
            aux = {name: jnp.mean(jnp.stack([s[name] for s in layer_stats]), axis=0)
                   for name in ("aux_loss", "z_loss", "dropped_fraction")}
            aux["expert_load"] = jnp.stack([s["expert_load"] for s in layer_stats])
        else:
            zero = jnp.zeros((), jnp.float32)
            aux = {"aux_loss": zero, "z_loss": zero, "dropped_fraction": zero,
                   "expert_load": jnp.zeros((0, 1), jnp.float32)}
        return logits, aux
