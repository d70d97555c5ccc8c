"""Stage 3, instruction tuning: chat rendering, the assistant-only loss, packing and a real SFT run."""

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.transformer import Transformer
from moe_scaling.train.data import encode
from moe_scaling.train.sft import IGNORE, load_chat, pack, render, sft
from moe_scaling.train.step import loss_fn

CHAT = Path(__file__).parent / "data" / "chat.jsonl"
MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                    d_expert=32, n_shared=1, max_seq_len=128)
EXAMPLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
           {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again?"},
           {"role": "assistant", "content": "Hello."}]


def test_only_assistant_text_and_its_end_marker_are_trained():
    ids, mask = render(EXAMPLE, encode)
    text = bytes(ids.astype(np.uint8)).decode()
    assert text == ("<|system|>\nBe brief.<|end|>\n<|user|>\nSay hi.<|end|>\n<|assistant|>\nHi!<|end|>\n"
                    "<|user|>\nAgain?<|end|>\n<|assistant|>\nHello.<|end|>\n")
    assert bytes(ids[mask == 1].astype(np.uint8)).decode() == "Hi!<|end|>\nHello.<|end|>\n"
    x, y = pack([(ids, mask)], seq_len=16, eos=0)
    assert x.shape == y.shape and x.shape[1] == 16
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    trained = flat_y != IGNORE
    # every trained target is the next input token, and exactly the assistant tokens are trained
    assert np.array_equal(flat_y[:-1][trained[:-1]], flat_x[1:][trained[:-1]])
    assert bytes(flat_y[trained].astype(np.uint8)).decode() == "Hi!<|end|>\nHello.<|end|>\n"


def test_assistant_only_loss_equals_a_hand_computation():
    """loss_fn(masked=True) = sum over trained targets of -log softmax(logits)[target] / their
    number, computed here in float64 NumPy from the same logits."""
    model = Transformer(MODEL, rngs=nnx.Rngs(params=3))
    rendered = [render(m, encode) for m in load_chat(CHAT)[:4]]
    x, y = pack(rendered, seq_len=64, eos=0)
    x, y = x[:4], y[:4]
    loss, _ = loss_fn(model, jnp.asarray(x), jnp.asarray(y), dispatch="dropless", capacity_factor=1.25,
                      dtype=jnp.float32, masked=True)
    logits, _ = model(jnp.asarray(x), dispatch="dropless")
    lg = np.asarray(logits, np.float64).reshape(-1, MODEL.vocab_size)
    logp = lg - lg.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    t = y.reshape(-1)
    keep = t != IGNORE
    want = -logp[np.arange(t.size)[keep], t[keep]].mean()
    assert 0 < keep.sum() < t.size
    assert float(loss) == pytest.approx(want, rel=1e-5)       # float32 vs float64: conftest.F32_TOL
    # not the plain mean over every target
    plain = -logp[np.arange(t.size), np.where(keep, t, 0)].mean()
    assert abs(plain - want) > 1e-3


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"text": "hi"}', 'needs a non-empty "messages" list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
])
def test_bad_chat_lines_are_one_line_errors(tmp_path, line, message):
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_chat(f)
    assert f"chat.jsonl:2" in str(err.value) and "\n" not in str(err.value)


def test_sft_lowers_the_held_out_assistant_loss_and_saves_a_checkpoint(tmp_path):
    """60 steps on the fixture from a fresh model: the held-out assistant-only loss falls; the final
    state is a checkpoint that the next stage (and load_checkpoint) reads."""
    from moe_scaling.train.checkpoints import load_checkpoint

    train_cfg = TrainConfig(tokens=60 * 8 * 128, batch_size=8, lr=3e-3, warmup=0.1, eval_every=20, seed=0)
    data_cfg = DataConfig(corpus=str(CHAT), seq_len=128, valid_fraction=0.2)
    r = sft(MODEL, train_cfg, data_cfg, Transformer(MODEL, rngs=nnx.Rngs(params=0)), ckpt_dir=tmp_path / "ckpt")
    assert r.status == "completed" and r.steps == 60
    assert [c["step"] for c in r.curve] == list(range(0, 61, 10))           # a row every log_every steps
    assert [c["step"] for c in r.curve if not math.isnan(c["eval_loss"])] == [0, 20, 40, 60]
    assert r.final_eval_loss < r.curve[0]["eval_loss"] - 1.0, r.curve
    model, record = load_checkpoint(tmp_path / "ckpt", MODEL, train_cfg, data_cfg)
    assert record["status"] == "completed" and record["step"] == 60
    again = sft(MODEL, TrainConfig(**{**train_cfg.to_dict(), "tokens": 8 * 128}), data_cfg, tmp_path / "ckpt")
    # the same weights evaluated again: float32's last bits at a loss of ~3 (eps x 3 = 4e-7)
    assert again.curve[0]["eval_loss"] == pytest.approx(r.final_eval_loss, abs=1e-6)
