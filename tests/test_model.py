"""The decoder: shapes, causality, parameter counts and dispatch equivalence at model level.

Tolerances are float32 round-off (tests/conftest.py): 1e-6 (~8 eps) for element-wise functions (RoPE),
1e-5 (conftest.F32_TOL) through matmuls, layers and gradients; bf16 where stated at the test.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_scaling.config import ModelConfig
from moe_scaling.costs import param_counts
from moe_scaling.model.transformer import RouterBias, Transformer, causal_attention

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
CONFIGS = {
    "dense": ModelConfig(**TINY),
    "moe_gqa_shared": ModelConfig(**TINY, n_kv_heads=2, n_experts=8, top_k=2, d_expert=16,
                                  n_shared=1, d_shared=24),
    "moe_sigmoid_bias_gated": ModelConfig(**TINY, n_experts=6, top_k=3, d_expert=8, router="sigmoid",
                                          router_bias=True, n_shared=2, shared_gate=True,
                                          n_dense_layers=1, attn_bias=True, qk_norm=False,
                                          tie_embeddings=False, norm_topk=False),
}


def _tokens(seed, batch=2, seq=16):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, 256)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_costs(name):
    cfg = CONFIGS[name]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == param_counts(cfg).total
    buffers = jax.tree.leaves(nnx.state(model, RouterBias))
    assert len(buffers) == (cfg.n_moe_layers if cfg.router_bias else 0)


@pytest.mark.parametrize("name", ["dense", "moe_gqa_shared"])
def test_forward_shapes_and_aux(name):
    cfg = CONFIGS[name]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(_tokens(0), dispatch="capacity")
    assert logits.shape == (32, 256) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    if cfg.is_moe:
        assert aux["expert_load"].shape == (cfg.n_moe_layers, cfg.n_experts)
        np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
        assert float(aux["aux_loss"]) >= 1.0 - 1e-6  # the balance loss is minimal (1) when uniform
    else:
        assert float(aux["aux_loss"]) == 0.0 and float(aux["dropped_fraction"]) == 0.0


def test_causal_future_tokens_do_not_change_past_logits():
    model = Transformer(CONFIGS["moe_gqa_shared"], rngs=nnx.Rngs(1))
    a = _tokens(2, batch=1)
    b = a.at[0, 10:].set((a[0, 10:] + 7) % 256)
    la, _ = model(a, dispatch="dropless")
    lb, _ = model(b, dispatch="dropless")
    np.testing.assert_allclose(la[:10], lb[:10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[10:], lb[10:])


@pytest.mark.parametrize("seq", [16, 192, 256])
def test_blocked_causal_attention_equals_the_full_masked_square(seq):
    # Inputs and the reference in NumPy (float64): eager JAX ops compile a kernel per op and shape.
    rng = np.random.default_rng(seq)
    q = rng.standard_normal((2, 2, 3, seq, 8)).astype(np.float32)   # [B, kv, group, S, hd]
    k = rng.standard_normal((2, 2, seq, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, seq, 8)).astype(np.float32)
    s = np.einsum("bkgqd,bksd->bkgqs", q.astype(np.float64), k.astype(np.float64))
    s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    want = np.einsum("bkgqs,bksd->bkgqd", p / p.sum(axis=-1, keepdims=True), v.astype(np.float64))
    # jitted as in the model's steps (one compilation, not one per eager op)
    got = jax.jit(causal_attention, static_argnums=3)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_mask_is_computed_in_the_program_not_stored():
    """The mask comes from iotas inside the program: the compiled attention at 2,048 tokens holds
    under 1 kB of constants (a stored mask was 37.7 MB per layer here, 6 GB for MobileMoE-L at 4,096)."""
    import re

    q = jax.ShapeDtypeStruct((1, 2, 4, 2048, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 2, 2048, 16), jnp.float32)
    hlo = jax.jit(lambda q, k, v: causal_attention(q, k, v, jnp.float32)).lower(q, k, k).compile().as_text()
    sizes = [int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
             for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* constant\(", hlo)]
    assert sum(sizes) * 4 < 1024


@pytest.mark.parametrize("name", ["moe_gqa_shared", "moe_sigmoid_bias_gated"])
def test_dispatch_methods_match_reference_with_gradients(name):
    cfg = CONFIGS[name]
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if cfg.router_bias:  # a non-zero selection bias must steer the choice identically everywhere
        rest = jax.tree.map(lambda b: b + jnp.linspace(-0.5, 0.5, b.shape[-1]), rest)
    tokens = _tokens(4)

    def run(params, method):
        def loss(params):
            logits, aux = nnx.merge(graphdef, params, rest)(tokens, dispatch=method,
                                                             capacity_factor=float(cfg.n_experts))
            return jnp.mean(jax.nn.log_softmax(logits)[:, 0]) + aux["aux_loss"], logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    run = jax.jit(run, static_argnums=1)
    (_, ref_logits), ref_grads = run(params, "reference")
    for method in ("capacity", "dropless", "ragged"):
        (_, logits), grads = run(params, method)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert np.max(np.abs(g - r)) <= 1e-5 * max(1.0, float(np.max(np.abs(r))))


def test_bfloat16_compute_is_finite_and_close():
    model = Transformer(CONFIGS["moe_gqa_shared"], rngs=nnx.Rngs(5))
    l32, _ = model(_tokens(6), dispatch="dropless")
    l16, _ = model(_tokens(6), dispatch="dropless", dtype=jnp.bfloat16)
    assert l16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(l16)))
    # bf16 keeps 8 significand bits (relative rounding 2^-9 = 0.002 per operand). These logits are at
    # most 0.71 in size, so a few layers of such roundings move them by ~0.001-0.01 (measured 0.0013,
    # the same on AVX-512 and AVX2); 0.1 is the same size as the logits' own spread (sd 0.12): it
    # catches a wrong computation, not rounding
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1


def test_same_seed_same_init_and_dense_twin_runs():
    cfg = CONFIGS["moe_gqa_shared"]
    a = nnx.state(Transformer(cfg, rngs=nnx.Rngs(7)), nnx.Param)
    b = nnx.state(Transformer(cfg, rngs=nnx.Rngs(7)), nnx.Param)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    twin = Transformer(dataclasses.replace(cfg).dense_twin(), rngs=nnx.Rngs(7))
    logits, _ = twin(_tokens(8), dispatch="capacity")
    assert logits.shape == (32, 256)


def test_rope_is_the_rotate_half_rotation():
    """apply_rope equals x * cos + rotate_half(x) * sin written out independently (Hugging Face
    Llama convention), gradient included, and really rotates."""
    from moe_scaling.model.transformer import apply_rope, rope_tables

    def plain(x, cos, sin):  # pairs (x1[i], x2[i]) rotated by the angle of (cos, sin)[:, i]
        half = x.shape[-1] // 2
        x1, x2, c, s = x[..., :half], x[..., half:], cos[None, :, None, :half], sin[None, :, None, :half]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    cos, sin = rope_tables(12, 16, 10000.0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 12, 3, 16)), jnp.float32)
    c = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    np.testing.assert_allclose(apply_rope(x, cos, sin), plain(x, cos, sin), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda x: jnp.sum(apply_rope(x, cos, sin) * c))(x)
    g_plain = jax.grad(lambda x: jnp.sum(plain(x, cos, sin) * c))(x)
    np.testing.assert_allclose(g_ours, g_plain, rtol=1e-5, atol=1e-6)
    assert not np.allclose(apply_rope(x, cos, sin), x)  # positions > 0 really rotate
