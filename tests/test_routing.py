"""Routing and dispatch: every algorithm computes the reference function (values and gradients).

Tolerances are float32 round-off (tests/conftest.py): rtol 1e-6 (~8 eps) for element-wise functions
and short sums (softmax weights, SwiGLU), 1e-5 (conftest.F32_TOL) through matmuls and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from moe_scaling.model import routing as R

jax.config.update("jax_default_matmul_precision", "highest")


def _problem(seed, t, d, e, k, f, kind="softmax", norm_topk=True, bias=False):
    # Drawn with NumPy: jax.random would compile a sampler for every new shape, which took about
    # as long as the dispatch programs under test.
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    x = normal(t, d)
    params = {
        "router": normal(d, e),
        "w_gate_up": normal(e, d, 2 * f, scale=0.3),
        "w_down": normal(e, f, d, scale=0.3),
    }
    b = normal(e) if bias else None
    return x, params, dict(top_k=k, kind=kind, norm_topk=norm_topk, bias=b)


def _moe(method, x, params, route_kw, capacity_factor, mask=None):
    r = R.route(x @ params["router"], route_kw["top_k"], kind=route_kw["kind"],
                norm_topk=route_kw["norm_topk"], bias=route_kw["bias"])
    if mask is not None:  # zero the weights of chosen (token, choice) pairs
        r = r._replace(weights=r.weights * mask)
    return R.moe_experts(x, r, params["w_gate_up"], params["w_down"], method=method,
                         capacity_factor=capacity_factor)


def _value_and_grads(method, x, params, route_kw, capacity_factor=None, mask=None):
    cf = capacity_factor or params["router"].shape[1] / route_kw["top_k"]

    def loss(x, params):
        y, dropped = _moe(method, x, params, route_kw, cf, mask)
        return jnp.sum(jnp.sin(y)), (y, dropped)

    (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    return y, dropped, grads


def _assert_close(a, b, tol=1e-5):
    """Every leaf within ``tol`` of the reference, relative to the leaf's largest magnitude
    (float32 sums taken in another order differ by a few ulps of the largest terms)."""
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u), np.asarray(v)
        assert np.max(np.abs(u - v), initial=0.0) <= tol * max(1.0, np.max(np.abs(v), initial=0.0))


@settings(max_examples=10, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seed=st.integers(0, 2**16), t=st.integers(1, 40), d=st.sampled_from([4, 8, 16]),
       e=st.integers(2, 9), k_frac=st.floats(0.0, 1.0), f=st.sampled_from([3, 8]),
       kind=st.sampled_from(["softmax", "sigmoid"]), norm_topk=st.booleans(), bias=st.booleans())
def test_every_dispatch_equals_reference_without_drops(seed, t, d, e, k_frac, f, kind, norm_topk, bias):
    k = 1 + int(k_frac * (e - 1))
    x, params, route_kw = _problem(seed, t, d, e, k, f, kind, norm_topk, bias and kind == "sigmoid")
    y_ref, _, g_ref = _value_and_grads("reference", x, params, route_kw)
    for method in ("capacity", "dropless", "ragged"):
        y, dropped, g = _value_and_grads(method, x, params, route_kw)
        assert float(dropped) == 0.0
        _assert_close(y, y_ref)
        _assert_close(g, g_ref)


def test_capacity_drops_exactly_the_overflow_in_token_order():
    t, d, e, k, f, cf = 48, 8, 4, 2, 5, 0.5
    x, params, route_kw = _problem(3, t, d, e, k, f)
    experts = np.asarray(R.route(x @ params["router"], k).experts)
    cap = R.capacity(t, k, e, cf)
    # Independent bookkeeping: an expert keeps its first `cap` assignments in (token, choice) order.
    seen, keep = np.zeros(e, int), np.zeros((t, k), np.float32)
    for i in range(t):
        for j in range(k):
            keep[i, j] = seen[experts[i, j]] < cap
            seen[experts[i, j]] += 1
    assert keep.min() == 0.0, "the test needs some drops"
    y_ref, _, g_ref = _value_and_grads("reference", x, params, route_kw, mask=jnp.asarray(keep))
    y, dropped, g = _value_and_grads("capacity", x, params, route_kw, capacity_factor=cf)
    assert float(dropped) == pytest.approx(1.0 - keep.mean())
    _assert_close(y, y_ref)
    _assert_close(g, g_ref)


def test_capacity_is_rounded_and_bounded():
    assert R.capacity(2048, 8, 64, 1.25) == 320
    assert R.capacity(10, 2, 4, 1.0) == 8          # ceil(5) -> 8
    assert R.capacity(5, 4, 4, 4.0) == 5           # never more than T
    assert R.capacity(3, 1, 64, 0.1) == 3


def test_route_softmax_and_sigmoid_with_selection_bias():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    r = R.route(logits, 2, kind="softmax", norm_topk=False)
    p = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()
    assert r.experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(r.weights, [p[:2]], rtol=1e-6)
    r = R.route(logits, 2, kind="softmax", norm_topk=True)
    np.testing.assert_allclose(r.weights, [p[:2] / p[:2].sum()], rtol=1e-6)
    # The bias picks experts 2 and 3, but their weights are the unbiased sigmoid scores.
    r = R.route(logits, 2, kind="sigmoid", norm_topk=False, bias=jnp.array([0.0, 0.0, 5.0, 5.0]))
    assert sorted(r.experts[0].tolist()) == [2, 3]
    np.testing.assert_allclose(sorted(r.weights[0].tolist()), sorted(1 / (1 + np.exp([0.0, 1.0]))), rtol=1e-6)
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-6)


def test_balance_and_z_losses():
    e, t = 4, 8
    uniform = R.route(jnp.zeros((t, e)), 1)._replace(experts=jnp.arange(t)[:, None] % e)
    assert float(R.load_balance_loss(uniform)) == pytest.approx(1.0)
    collapsed = R.route(jnp.tile(jnp.array([[50.0, 0, 0, 0]]), (t, 1)), 1)
    # softmax of a 50-logit gap is 1 - 2e-22: exact in float32 but for the sums' rounding (1e-6); 1e-4 spare
    assert float(R.load_balance_loss(collapsed)) == pytest.approx(e, rel=1e-4)
    logits = np.random.default_rng(0).normal(size=(t, e)).astype(np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(R.router_z_loss(jnp.asarray(logits))) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
    load = R.expert_load(jnp.array([[0, 1], [0, 2]]), 4)
    np.testing.assert_allclose(load, [0.5, 0.25, 0.25, 0.0])


def test_resolve_dispatch():
    assert R.resolve_dispatch("auto", "cpu") == "capacity"
    assert R.resolve_dispatch("auto", "gpu") == "ragged"
    assert R.resolve_dispatch("dropless") == "dropless"
    with pytest.raises(ValueError):
        R.resolve_dispatch("gshard")


@pytest.mark.parametrize("shape", [(6, 10), (3, 5, 8)])
def test_swiglu_and_its_fused_gradient_equal_the_plain_formula(shape):
    """swiglu's custom VJP (one select pass) equals autodiff of silu(gate) * up, and the
    row-scaled variant used before the down projection equals swiglu(h) * w, gradients too."""
    def plain(h):
        gate, up = jnp.split(h, 2, axis=-1)
        return jax.nn.silu(gate) * up

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32)
    c = jnp.asarray(rng.standard_normal(shape[:-1] + (shape[-1] // 2,)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(shape[:-1] + (1,)), jnp.float32)
    np.testing.assert_allclose(R.swiglu(h), plain(h), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda h: jnp.sum(R.swiglu(h) * c))(h)
    g_plain = jax.grad(lambda h: jnp.sum(plain(h) * c))(h)
    np.testing.assert_allclose(g_ours, g_plain, rtol=1e-5, atol=1e-6)
    ours = jax.grad(lambda h, w: jnp.sum(R._swiglu_scaled(h, w) * c), argnums=(0, 1))(h, w)
    ref = jax.grad(lambda h, w: jnp.sum(plain(h) * w * c), argnums=(0, 1))(h, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
