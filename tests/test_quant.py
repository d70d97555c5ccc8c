"""The INT4 group-32 fake quantizer (moe_scaling/model/quant.py) against an independent NumPy
reference written from the format's definition (symmetric int4 in [-8, 7], one fp16 scale per 32
consecutive input-axis weights, scale = max|w| / 7.5, round half to even), bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_scaling.config import ModelConfig
from moe_scaling.model.quant import fake_quant_int4, fake_quant_params, quantize_int4, quantized_weights
from moe_scaling.model.transformer import Transformer


def reference_int4(w: np.ndarray, axis: int) -> np.ndarray:
    """NumPy, float64 intermediate; loops over groups explicitly."""
    w = np.ascontiguousarray(np.moveaxis(np.asarray(w, np.float32), axis, -1))
    out = np.empty_like(w)
    flat, oflat = w.reshape(-1, w.shape[-1]), out.reshape(-1, w.shape[-1])
    for r in range(flat.shape[0]):
        for g0 in range(0, flat.shape[1], 32):
            grp = flat[r, g0:g0 + 32]
            amax = np.float32(np.max(np.abs(grp)))
            s = np.float16(max(amax / np.float32(7.5), np.float32(np.finfo(np.float16).tiny)))
            s32 = np.float32(s)
            q = np.clip(np.rint(grp / s32), -8, 7).astype(np.int8)  # int4 codes: no negative zero
            oflat[r, g0:g0 + 32] = q.astype(np.float32) * s32
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("shape,axis", [((64, 96), 0), ((96, 64), 1), ((3, 64, 32), 1), ((2, 32, 128), 1)])
def test_fake_quant_matches_numpy_reference_bit_for_bit(shape, axis):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * rng.choice([1e-3, 0.02, 1.0], size=shape)).astype(np.float32)
    w.reshape(-1)[:32] = 0.0  # an all-zero group
    w.reshape(-1)[40] = 0.0
    got = np.asarray(fake_quant_int4(jnp.asarray(w), axis))
    want = reference_int4(w, axis)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # at most 16 distinct levels per group and integer codes in [-8, 7]
    q, s = quantize_int4(jnp.asarray(w), axis)
    assert int(jnp.min(q)) >= -8 and int(jnp.max(q)) <= 7 and s.dtype == jnp.float16


def test_straight_through_gradient():
    w = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(32, 2)
    g = jax.grad(lambda w: jnp.sum(fake_quant_int4(w, 0) * jnp.arange(64.0).reshape(32, 2)))(w)
    np.testing.assert_array_equal(np.asarray(g), np.arange(64.0).reshape(32, 2))


def test_every_linear_and_expert_weight_is_quantized_and_nothing_else():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      n_experts=4, top_k=2, d_expert=32, n_shared=1, d_shared=64, n_dense_layers=1)
    state = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
    names = dict(quantized_weights(state))
    assert names == {
        "['blocks'][0]['attn']['wqkv']": 0, "['blocks'][0]['attn']['wo']": 0,
        "['blocks'][0]['ffn']['w_gate_up']": 0, "['blocks'][0]['ffn']['w_down']": 1,
        "['blocks'][1]['attn']['wqkv']": 0, "['blocks'][1]['attn']['wo']": 0,
        "['blocks'][1]['ffn']['w_gate_up']": 1, "['blocks'][1]['ffn']['w_down']": 1,
        "['blocks'][1]['ffn']['shared']['w_gate_up']": 0, "['blocks'][1]['ffn']['shared']['w_down']": 1}
    _, params, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)  # an nnx.State too
    assert len(quantized_weights(params)) == len(names)
    fq = fake_quant_params(state)
    for path, leaf in jax.tree_util.tree_leaves_with_path(fq):
        key = jax.tree_util.keystr(path)
        orig = np.asarray(eval("state" + key))
        if key in names:
            np.testing.assert_array_equal(np.asarray(leaf), reference_int4(orig, names[key]))
        else:
            np.testing.assert_array_equal(np.asarray(leaf), orig)


def test_int8_activation_fake_quant_per_token():
    from moe_scaling.model.quant import fake_quant_act_int8
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32) * 3
    got = np.asarray(fake_quant_act_int8(jnp.asarray(x)))
    for row, g in zip(x, got):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        s = np.float32((hi - lo) / 255.0)
        zp = np.clip(np.rint(-128 - lo / s), -128, 127)
        want = (np.clip(np.rint(row / s) + zp, -128, 127) - zp) * s
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-6)   # the same float32 products k x s: a last bit
        assert np.abs(g - row).max() <= s * 0.5 + 1e-6
