"""The ONNX Runtime export: INT4 packing, the runtime's logits against our INT4 model, KV-cache decode,
a trained run through ``moe-export --runtime onnx``, bad input.

Needs the ``ondevice`` extra (onnx + onnxruntime; .ci/run installs it)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import EXPORT_DATA, export_cli, perturbed_model, quick_train
from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.quant import fake_quant_params
from moe_scaling.ondevice.onnx_graph import pack_int4
from moe_scaling.ondevice.runtime import OnnxLM, export_onnx
from moe_scaling.train.checkpoints import load_checkpoint

BASE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
CASES = {
    "dense-qk-norm": ModelConfig(**BASE, d_ff=128),
    "dense-untied-bias": ModelConfig(**BASE, d_ff=96, qk_norm=False, attn_bias=True, tie_embeddings=False),
    # sigmoid router + selection bias, renormalised top-k, two shared experts
    "moe-sigmoid-bias-shared": ModelConfig(**BASE, n_experts=4, top_k=2, d_expert=32, n_shared=2, d_shared=32,
                                           router="sigmoid", router_bias=True, attn_bias=True),
    # softmax router without renormalisation (the study's), gated shared expert, dense first layer
    "moe-softmax-gated-dense-first": ModelConfig(**BASE, d_ff=96, n_experts=8, top_k=2, d_expert=32, n_shared=1,
                                                 d_shared=64, shared_gate=True, qk_norm=False, norm_topk=False,
                                                 n_dense_layers=1),
}
TOKENS = np.random.default_rng(0).integers(0, 256, 24)


def int4_model(cfg):
    """A perturbed model with its weights replaced by their INT4 fake quantization (what QAT trains
    and what the runtime stores)."""
    model = perturbed_model(cfg)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, fake_quant_params(nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def our_logits(model, tokens):
    logits, _ = model(jnp.asarray(np.asarray(tokens).reshape(1, -1)), dispatch="dropless")
    return np.asarray(logits)


def test_int4_packing_is_the_quantizer_bit_for_bit():
    """Unpacked independently (low nibble first, code - 8, times the group's scale), the runtime's
    operands are exactly our fake-quantized weights, transposed to [N, K]."""
    w = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32) * 0.05
    w[:32, 0] = 0.0                                                    # an all-zero group
    packed, scales = pack_int4(w)
    assert packed.shape == (40, 3, 16) and packed.dtype == np.uint8 and scales.shape == (40, 3)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(40, 3, 32).astype(np.float32) - 8
    assert codes.min() >= -8 and codes.max() <= 7
    assert np.array_equal(scales, scales.astype(np.float16).astype(np.float32))   # fp16-exact scales
    w_hat = (codes * scales[:, :, None]).reshape(40, 96).T
    assert np.array_equal(w_hat, np.asarray(fake_quant_params({"wo": w})["wo"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_runtime_computes_our_int4_logits_and_decodes_with_its_cache(tmp_path, name):
    cfg = CASES[name]
    model = int4_model(cfg)
    ours = our_logits(model, TOKENS)
    export_onnx(cfg, perturbed_model(cfg), tmp_path / "fp32", activations="fp32")
    lm = OnnxLM(tmp_path / "fp32")
    full, _ = lm.forward(TOKENS)
    assert np.abs(ours).max() > 1.0
    assert np.abs(full - ours).max() < 1e-4       # same INT4 weights, float products: test_export's TOL
    logits, cache = lm.prefill(TOKENS[:10])                # prefill, a chunk after the cache, then decode
    chunk, cache = lm.forward(TOKENS[10:16], cache)
    rows = [logits, chunk]
    for t in TOKENS[16:]:
        row, cache = lm.decode(int(t), cache)
        rows.append(row[None])
    assert np.abs(np.concatenate(rows) - full).max() < 1e-4
    assert cache["past_key_0"].shape == (1, cfg.n_kv_heads, len(TOKENS), cfg.head_dim)


def test_timing_helpers_decode_each_token_after_the_prefill_with_the_growing_cache(tmp_path):
    """``decode_ms(tokens, after)`` (the benchmarks' decode timing) prefills ``tokens[:after]`` and
    decodes every later token once, in order, each on the cache one position longer."""
    cfg = CASES[sorted(CASES)[0]]
    export_onnx(cfg, perturbed_model(cfg), tmp_path / "m")
    lm = OnnxLM(tmp_path / "m")
    calls, decode = [], lm.decode
    lm.decode = lambda t, cache: (calls.append((t, cache["past_key_0"].shape[2])), decode(t, cache))[1]
    assert lm.decode_ms(TOKENS, 10) > 0
    assert calls == [(int(t), 10 + i) for i, t in enumerate(TOKENS[10:])]
    assert lm.prefill_ms(TOKENS[:10], reps=2) > 0 and len(calls) == len(TOKENS) - 10


DATA = EXPORT_DATA
cli = export_cli


@pytest.mark.parametrize("cfg", [
    ModelConfig(**{**BASE, "d_model": 256, "n_layers": 4}, n_experts=16, top_k=2, d_expert=128, n_shared=1,
                d_shared=128, router="softmax", norm_topk=False),
    ModelConfig(**{**BASE, "d_model": 256, "n_layers": 3}, d_ff=768, tie_embeddings=False, attn_bias=True),
], ids=["moe-tied", "dense-untied"])
def test_file_size_is_the_cost_models_bytes_for_the_runtime(tmp_path, cfg):
    """model.onnx holds what costs.stored_bytes counts for ONNX Runtime (INT4 with fp16 scales, float32
    embedding stored once, router and norms, RoPE tables), within issue 25's 2%. What is left is the
    file format's own names and nodes: measured ~10 KB here, 0.05% on the ~100 MB bench models."""
    from moe_scaling.costs import stored_bytes
    summary = export_onnx(cfg, perturbed_model(cfg), tmp_path / "m")
    size = (tmp_path / "m" / "model.onnx").stat().st_size
    assert summary["bytes"] == size and summary["cost_model_bytes"] == int(stored_bytes(cfg, "onnxruntime"))
    assert size > 1e6                                         # large enough for 2% to be a real check
    assert abs(size / stored_bytes(cfg, "onnxruntime") - 1) < 0.02
    # the scales are stored as float16, one per group of 32 weights
    import onnx
    inits = {t.name: t for t in onnx.load(str(tmp_path / "m" / "model.onnx")).graph.initializer}
    scales = [t for n, t in inits.items() if n.endswith(".scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)



def test_trained_run_through_the_cli_int8_activations_keep_the_loss(tmp_path):
    """A trained MoE exported with the on-device scheme (int8 dynamic activations, INT4 weights):
    on held-out real text its loss is within 0.005 nats of our INT4 model's, and greedy decoding
    through the KV cache reproduces the full forward's argmax."""
    cfg = ModelConfig(**{**BASE, "d_model": 128}, n_experts=8, top_k=2, d_expert=64, n_shared=1, d_shared=64,
                      router="softmax", norm_topk=False)
    train_cfg = quick_train(cfg, tmp_path / "run", steps=40, data=DATA)
    r = cli(tmp_path / "run", "--out", tmp_path / "onnx", "--runtime", "onnx", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["files"] == ["model.onnx", "runtime.json"] and summary["step"] == 40
    assert summary["activations"] == "int8" and summary["int4_weight_bytes"] > 0
    meta = json.loads((tmp_path / "onnx" / "runtime.json").read_text())
    assert ModelConfig.from_dict(meta["model"]) == cfg and meta["max_positions"] == cfg.max_seq_len
    model, _ = load_checkpoint(tmp_path / "run", cfg, train_cfg, DATA)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, fake_quant_params(nnx.to_pure_dict(state)))
    nnx.update(model, state)
    text = Path(DATA.corpus).read_bytes()[-4 * 64:]                    # the held-out end of the corpus
    lm = OnnxLM(tmp_path / "onnx", threads=2)
    ours, theirs = [], []
    for i in range(4):
        seq = np.frombuffer(text[i * 64:(i + 1) * 64], np.uint8).astype(np.int64)
        logits = our_logits(model, seq[:-1])
        z = logits - logits.max(-1, keepdims=True)
        ours.append(float(-(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(63), seq[1:]].mean()))
        theirs.append(lm.loss(seq))
    assert 1.5 < np.mean(ours) < 5.0                                    # trained: far below log(256) = 5.55
    print(f"\nheld-out loss: ours (INT4, f32 activations) {np.mean(ours):.5f}, runtime (int8 activations) "
          f"{np.mean(theirs):.5f}")
    # int8 activations cost the model less than a quarter of the pooled seed-to-seed noise floor of
    # the isoFLOP study's losses (0.018 nats, README): a difference no fit could see. Measured: equal to
    # 4 decimals.
    assert abs(np.mean(theirs) - np.mean(ours)) < 0.005, (ours, theirs)
    prompt = np.frombuffer(text[:16], np.uint8).astype(np.int64)
    out = lm.generate(prompt, 8)
    full, _ = lm.forward(np.concatenate([prompt, out[:-1]]))
    assert out == [int(t) for t in np.argmax(full[15:], axis=-1)]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    r = cli(tmp_path / "missing", "--out", tmp_path / "o", "--runtime", "onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such directory" in r.stderr
    # d_model 48 has no whole INT4 groups of 32: refused before restoring or writing anything
    odd = ModelConfig(vocab_size=256, d_model=48, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32)
    quick_train(odd, tmp_path / "odd", steps=1, data=DATA)
    r = cli(tmp_path / "odd", "--out", tmp_path / "o", "--runtime", "onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model.d_model = 48" in r.stderr and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="no model.onnx"):
        OnnxLM(tmp_path)
    small_heads = ModelConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 4}, d_ff=128)     # head_dim 8
    with pytest.raises(ConfigError, match="model.head_dim = 8: ONNX Runtime's CPU attention"):
        export_onnx(small_heads, perturbed_model(small_heads), tmp_path / "h")
    with pytest.raises(ConfigError, match="activations"):
        export_onnx(CASES["dense-qk-norm"], perturbed_model(CASES["dense-qk-norm"]), tmp_path / "a", activations="int4")
    export_onnx(CASES["dense-qk-norm"], perturbed_model(CASES["dense-qk-norm"]), tmp_path / "ok", max_positions=8)
    with pytest.raises(ConfigError, match="longer than the exported max_positions 8"):
        OnnxLM(tmp_path / "ok").forward(TOKENS[:9])
