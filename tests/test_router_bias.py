"""Auxiliary-loss-free load balancing: the router-bias update of sigmoid routers with a bias.

Real training on tinyshakespeare. Without an auxiliary balance loss the tiny model below routes
most tokens to the same two of its eight experts within 60 steps (max/mean load ~3.6 of a
possible 4); the bias update keeps it balanced (~1.3).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SHARED_DATA
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig, load_config, save_config
from moe_scaling.errors import ConfigError
from moe_scaling.train.data import load_tokens, train_batch
from moe_scaling.model.transformer import RouterBias
from moe_scaling.train.checkpoints import load_checkpoint
from moe_scaling.train.loop import train
from moe_scaling.train.step import balance_bias_update, init_state, make_train_step

E = 8
MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, n_experts=E, top_k=2,
                    d_expert=16, router="sigmoid", router_bias=True, max_seq_len=32)
DATA = DataConfig(corpus=str(SHARED_DATA / "text" / "tinyshakespeare" / "input.txt"), seq_len=32,
                  max_tokens=60_000)
BATCH = 4


def _train_cfg(steps, **kw):
    # No balance loss and a small learning rate: the bias update is the only balancing force.
    base = dict(tokens=steps * BATCH * DATA.seq_len, batch_size=BATCH, lr=3e-4, warmup=2,
                aux_loss_coef=0.0, eval_every=steps, eval_batches=1, log_every=10, ckpt_every=steps, seed=0)
    return TrainConfig(**{**base, **kw})


def _biases(model) -> np.ndarray:
    """``[n_moe_layers, E]`` router biases of a model."""
    return np.stack([np.asarray(b) for b in jax.tree.leaves(nnx.state(model, RouterBias))])


def _imbalance(load) -> float:
    """max load / mean load per MoE layer, averaged over the layers."""
    load = np.asarray(load)
    return float((load.max(axis=1) / load.mean(axis=1)).mean())


def test_update_rule_on_a_hand_made_load():
    u = 1e-3
    bias = jnp.asarray([0.1, -0.2, 0.0, 0.5, 0.03, 0.0, -0.07, 0.0], jnp.float32)
    counts = jnp.asarray([9, 3, 6, 6, 12, 0, 6, 6], jnp.int32)  # 48 tokens, mean 6
    got = np.asarray(balance_bias_update(bias, counts, u))
    sign = np.asarray([-1, 1, 0, 0, -1, 1, 0, 0], np.float32)   # over the mean: down; under: up
    np.testing.assert_array_equal(got, np.asarray(bias) + np.float32(u) * sign)
    step = got - np.asarray(bias)
    assert step[sign != 0] == pytest.approx(u * sign[sign != 0], abs=1e-7)  # magnitude u (float32 add)
    assert np.all(got[sign == 0] == np.asarray(bias)[sign == 0])             # at the mean: bit-exact
    assert step.sum() == pytest.approx(0.0, abs=1e-7)                         # 2 above, 2 below: zero-sum
    # Fractions of the load give the same step as the counts; rows of [layers, E] are independent.
    np.testing.assert_array_equal(np.asarray(balance_bias_update(bias, counts / 48.0, u)), got)
    two = balance_bias_update(jnp.stack([bias, bias]), jnp.stack([counts, counts[::-1]]), u)
    np.testing.assert_array_equal(np.asarray(two[0]), got)
    np.testing.assert_array_equal(np.asarray(two[1]), np.asarray(bias) + np.float32(u) * sign[::-1])
    # One expert over the mean, the rest under: the step is not zero-sum (only the sign counts).
    skew = balance_bias_update(jnp.zeros(4), jnp.asarray([10, 0, 0, 2]), u)
    np.testing.assert_array_equal(np.asarray(skew), np.float32(u) * np.asarray([-1, 1, 1, 1], np.float32))
    # Uniform load: nothing moves.
    np.testing.assert_array_equal(np.asarray(balance_bias_update(bias, jnp.full(8, 5), u)), np.asarray(bias))


def test_balancing_prevents_the_routing_collapse_of_real_training(tmp_path):
    steps = 60
    off = train(MODEL, _train_cfg(steps, bias_update_rate=0.0), DATA, ckpt_dir=tmp_path / "off", progress=False)
    on = train(MODEL, _train_cfg(steps, bias_update_rate=1e-3), DATA, ckpt_dir=tmp_path / "on", progress=False)
    assert off.status == on.status == "completed"
    # Load of the last 10 steps, max/mean (4 = all tokens on top_k of the 8 experts, 1 = uniform).
    # The thresholds are on that scale (collapsed above 3, balanced below 2), not off one run's
    # numbers (measured 3.6 off, 1.1-1.2 on).
    assert off.metrics["load_imbalance"] > 3.0, off.metrics["load_imbalance"]
    assert on.metrics["load_imbalance"] < 2.0, on.metrics["load_imbalance"]
    assert on.metrics["load_imbalance"] < 0.6 * off.metrics["load_imbalance"]
    bias_off = _biases(load_checkpoint(tmp_path / "off", MODEL, _train_cfg(steps, bias_update_rate=0.0), DATA)[0])
    bias_on = _biases(load_checkpoint(tmp_path / "on", MODEL, _train_cfg(steps, bias_update_rate=1e-3), DATA)[0])
    assert bias_off.shape == bias_on.shape == (MODEL.n_moe_layers, E)
    assert np.all(bias_off == 0.0)                                   # rate 0: never touched
    assert np.all(np.abs(bias_on) <= steps * 1e-3 + 1e-6)           # at most u per step
    assert np.all(np.ptp(bias_on, axis=1) > 10 * 1e-3)              # and it did move, per layer


def _run_steps(rate: float, start_bias: np.ndarray, steps: int):
    """Train ``steps`` steps with the jitted train step from a given router bias; returns the
    final biases, the per-step imbalance and the optimiser."""
    tc = _train_cfg(steps, bias_update_rate=rate)
    graphdef, state = init_state(MODEL, tc, steps)
    model, opt = nnx.merge(graphdef, state)
    for layer, moe in enumerate(b.ffn for b in model.blocks if b.is_moe):
        moe.router_bias[...] = jnp.asarray(start_bias[layer])
    state = nnx.state((model, opt))
    step = make_train_step(graphdef, tc, "capacity")
    tokens = load_tokens(DATA)[0]
    imbalance = []
    for s in range(steps):
        state, metrics = step(state, *train_batch(tokens, BATCH, DATA.seq_len, tc.seed, s))
        imbalance.append(_imbalance(metrics["expert_load"]))
    model, opt = nnx.merge(graphdef, state)
    return _biases(model), imbalance, opt


def test_rate_zero_keeps_a_skewed_bias_bit_identical_and_the_update_corrects_it():
    steps = 30
    start = np.zeros((MODEL.n_moe_layers, E), np.float32)
    start[:, :2] = 0.05  # experts 0 and 1 favoured: most tokens pick both (max/mean load near 4)
    kept, imb_off, opt = _run_steps(0.0, start, steps)
    np.testing.assert_array_equal(kept, start)   # no gradient, no AdamW step, no weight decay
    assert not jax.tree.leaves(nnx.state(opt, RouterBias))  # the optimiser holds no bias state
    fixed, imb_on, _ = _run_steps(3e-3, start, steps)
    assert imb_off[0] == imb_on[0] > 3.0         # the first step routes with the skewed bias
    assert np.all(fixed[:, :2] < start[:, :2])   # the favoured experts were pushed down ...
    off, on = np.mean(imb_off[-10:]), np.mean(imb_on[-10:])
    assert on < 2.0 < 3.0 < off and on < 0.6 * off, (on, off)  # ... and the load evened out


def test_models_without_a_router_bias_compile_the_same_step_for_any_rate():
    tokens = load_tokens(DATA)[0]
    x, y = train_batch(tokens, BATCH, DATA.seq_len, 0, 0)
    no_bias = ModelConfig(**{**MODEL.to_dict(), "router_bias": False})
    dense = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)

    def text(cfg, rate):
        tc = _train_cfg(4, bias_update_rate=rate)
        graphdef, state = init_state(cfg, tc, 4)
        return make_train_step(graphdef, tc, "capacity").lower(state, x, y).as_text()

    assert text(no_bias, 0.0) == text(no_bias, 1e-3)
    assert text(dense, 0.0) == text(dense, 1e-3)
    assert text(MODEL, 0.0) != text(MODEL, 1e-3)


def test_resume_with_a_router_bias_is_bit_exact(tmp_path):
    cfg = _train_cfg(10, bias_update_rate=1e-2, log_every=2, eval_every=5, ckpt_every=5)
    straight = train(MODEL, cfg, DATA, ckpt_dir=tmp_path / "straight", progress=False)
    first = train(MODEL, cfg, DATA, ckpt_dir=tmp_path / "resumed", progress=False, stop_at_step=5)
    assert first.status == "stopped" and first.steps == 5
    second = train(MODEL, cfg, DATA, ckpt_dir=tmp_path / "resumed", progress=False)
    assert second.status == "completed" and second.steps == 10
    rows = lambda r: [(c["step"], repr(c["train_loss"]), repr(c["eval_loss"])) for c in r.curve]  # noqa: E731
    assert rows(second) == rows(straight)
    a = load_checkpoint(tmp_path / "straight", MODEL, cfg, DATA)[0]
    b = load_checkpoint(tmp_path / "resumed", MODEL, cfg, DATA)[0]
    assert np.any(_biases(a) != 0.0)
    for u, v in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("value, problem", [
    (-0.001, "must be >= 0.0; give a number >= 0.0"),
    (math.nan, "must be a finite number; give a number"),
    (math.inf, "must be a finite number; give a number"),
    ("0.001", "must be a finite number; give a number"),
    (True, "must be a finite number; give a number"),
])
def test_bias_update_rate_is_validated(value, problem):
    with pytest.raises(ConfigError) as err:
        TrainConfig(bias_update_rate=value)
    assert str(err.value) == f"train.bias_update_rate = {value!r}: {problem}"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bias_update_rate_round_trips(tmp_path, suffix):
    assert TrainConfig().bias_update_rate == 1e-3 and TrainConfig(bias_update_rate=0).bias_update_rate == 0
    tc = TrainConfig(bias_update_rate=2.5e-3)
    save_config(tmp_path / f"run{suffix}", MODEL, tc, DATA)
    model, back, _ = load_config(tmp_path / f"run{suffix}")
    assert back == tc and back.bias_update_rate == 2.5e-3 and model == MODEL
