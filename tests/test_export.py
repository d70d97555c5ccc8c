"""moe-export: transformers loads the exported directory and computes our model's logits.

Needs the ``hf`` extra (torch CPU + transformers 5.24). Every architecture ``hf_model_type`` can
return is exported from a randomly perturbed model (norm scales, biases and the router's
selection bias included), loaded with ``AutoModelForCausalLM.from_pretrained`` in float32 with no
missing or unexpected key, and its logits compared with ours.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import EXPORT_DATA, export_cli, perturbed_model, quick_train
from moe_scaling.hf.config import hf_model_type
from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.hf.export import export_checkpoint, export_hf, hf_state_dict
from moe_scaling.model.transformer import Transformer
from moe_scaling.train.checkpoints import load_checkpoint

# glm4_moe without shared experts has zero-width shared_experts Linears; torch warns when
# transformers initialises them.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

# Logits of our model and transformers' PyTorch model: the same float32 mathematics summed by other
# kernels. conftest's round-off bound for logits of size ~10 at K <= 512 is ~3e-5; 1e-4 is the next decade.
TOL = 1e-4
BASE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
CASES = {
    "llama": ModelConfig(**BASE, d_ff=128, qk_norm=False, tie_embeddings=False),
    "qwen2": ModelConfig(**BASE, d_ff=128, qk_norm=False, attn_bias=True),
    "qwen3": ModelConfig(**BASE, d_ff=128),
    "mixtral": ModelConfig(**BASE, n_experts=4, top_k=2, d_expert=32, qk_norm=False, tie_embeddings=False),
    "qwen2_moe": ModelConfig(**BASE, d_ff=96, n_experts=4, top_k=2, d_expert=32, n_shared=1, d_shared=48,
                             shared_gate=True, qk_norm=False, attn_bias=True, norm_topk=False,
                             n_dense_layers=1),
    "qwen3_moe": ModelConfig(**BASE, n_experts=4, top_k=2, d_expert=32, tie_embeddings=False),
    "glm4_moe": ModelConfig(**BASE, n_experts=4, top_k=2, d_expert=32, n_shared=2, d_shared=32,
                            router="sigmoid", router_bias=True, attn_bias=True),
    "glm4_moe-dense-first-no-shared": ModelConfig(**BASE, d_ff=96, n_experts=4, top_k=2, d_expert=32,
                                                  router="sigmoid", qk_norm=False, norm_topk=False,
                                                  tie_embeddings=False, n_dense_layers=1),
}
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 16))


def our_logits(model, tokens):
    logits, _ = model(jnp.asarray(tokens), dispatch="dropless")
    return np.asarray(logits).reshape(*tokens.shape, -1)


def hf_logits(path, tokens, dtype=torch.float32):
    """Logits of the transformers model in ``path``; asserts a clean load (no missing,
    unexpected or mismatched key)."""
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(torch.as_tensor(tokens)).logits.float().numpy(), model


def stored(path):
    """``{name: (shape, dtype)}`` of a model.safetensors."""
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_computes_our_logits(tmp_path, name):
    cfg = CASES[name]
    model = perturbed_model(cfg)
    summary = export_hf(cfg, model, tmp_path / "m")
    assert summary["model_type"] == hf_model_type(cfg) == name.split("-")[0]
    assert summary["files"] == ["config.json", "model.safetensors"]
    theirs, hf = hf_logits(tmp_path / "m", TOKENS)
    ours = our_logits(model, TOKENS)
    assert np.abs(ours).max() > 1.0                              # a real signal, not near-zero logits
    assert np.abs(theirs - ours).max() < TOL
    # The file holds exactly what transformers' own save_pretrained writes (names, shapes, dtypes).
    hf.save_pretrained(tmp_path / "resaved")
    assert stored(tmp_path / "m") == stored(tmp_path / "resaved")


def test_bfloat16_export_is_the_rounded_model(tmp_path):
    """glm4_moe in bfloat16: the router and its selection bias stay float32 (as transformers keeps
    them); every other tensor is the bfloat16 rounding of ours."""
    cfg = CASES["glm4_moe"]
    model = perturbed_model(cfg)
    export_hf(cfg, model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    dtypes = {k: d for k, (_, d) in stored(tmp_path / "bf16").items()}
    assert {k for k, d in dtypes.items() if d == "F32"} == {
        "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.e_score_correction_bias"}
    assert set(dtypes.values()) == {"F32", "BF16"}
    state = nnx.state(model)
    keep = lambda path: any(n in jax.tree_util.keystr(path) for n in ("'router'", "'router_bias'"))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        lambda p, v: v if keep(p) else v.astype(jnp.bfloat16).astype(jnp.float32), nnx.to_pure_dict(state)))
    nnx.update(model, state)
    theirs, _ = hf_logits(tmp_path / "bf16", TOKENS)             # upcast to float32 when loading
    assert np.abs(theirs - our_logits(model, TOKENS)).max() < TOL
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")  # in the config's dtype
    assert native.dtype == torch.bfloat16 and native.model.layers[0].mlp.gate.weight.dtype == torch.float32
    native.save_pretrained(tmp_path / "resaved")
    assert stored(tmp_path / "bf16") == stored(tmp_path / "resaved")


def test_unsupported_config_or_foreign_params_are_refused_before_writing(tmp_path):
    softmax_ungated_shared = ModelConfig(**BASE, n_experts=4, top_k=2, d_expert=32, n_shared=1)
    with pytest.raises(ConfigError) as refused:
        hf_model_type(softmax_ungated_shared)
    model = Transformer(softmax_ungated_shared, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError) as err:
        export_hf(softmax_ungated_shared, model, tmp_path / "a")
    assert str(err.value) == str(refused.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="do not match the model config"):
        export_hf(CASES["qwen3"], Transformer(CASES["qwen3_moe"], rngs=nnx.Rngs(0)), tmp_path / "b")
    with pytest.raises(ConfigError, match="dtype"):
        export_hf(CASES["qwen3"], Transformer(CASES["qwen3"], rngs=nnx.Rngs(0)), tmp_path / "c", dtype="fp16")
    assert not any(tmp_path.iterdir())


def test_state_and_pure_dict_params_give_the_same_tensors():
    model = perturbed_model(CASES["qwen2_moe"])
    a = hf_state_dict(CASES["qwen2_moe"], model)
    b = hf_state_dict(CASES["qwen2_moe"], nnx.state(model))
    c = hf_state_dict(CASES["qwen2_moe"], nnx.to_pure_dict(nnx.state(model)))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)


# -- a trained run, end to end ------------------------------------------------------------------

DATA = EXPORT_DATA
cli = export_cli



def test_trained_run_exported_by_the_cli_loads_with_the_same_logits(tmp_path):
    cfg = ModelConfig(**BASE, n_experts=4, top_k=2, d_expert=32, n_shared=1, d_shared=64,
                      router="sigmoid", router_bias=True, max_seq_len=32)
    run = tmp_path / "run"                              # a sweep's layout: runs/<id>/ckpt
    train_cfg = quick_train(cfg, run / "ckpt", steps=6, data=DATA)
    r = cli(run, "--out", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["model_type"], summary["step"], summary["status"]) == ("glm4_moe", 6, "completed")
    assert sorted(summary["files"]) == ["README.md", "config.json", "model.safetensors"]
    model, _ = load_checkpoint(run / "ckpt", cfg, train_cfg, DATA)
    text = Path(DATA.corpus).read_bytes()[:64]           # real text as byte tokens
    tokens = np.frombuffer(text, np.uint8).astype(np.int64).reshape(2, 32)
    theirs, _ = hf_logits(tmp_path / "hf", tokens)
    assert np.abs(theirs - our_logits(model, tokens)).max() < TOL
    # train()'s ckpt_dir itself is accepted too and gives the same bytes.
    again = export_checkpoint(run / "ckpt", tmp_path / "hf2")
    assert again["parameters"] == summary["parameters"]
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()
    r = cli(run / "ckpt", "--out", tmp_path / "hf3", "--dtype", "bfloat16")
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {tmp_path / 'hf3'}/") and "glm4_moe: step 6" in r.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    r = cli(tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such directory" in r.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o")
    # A trained model no architecture represents: dense with QK-norm and q/k/v biases.
    tiny = ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, d_ff=32, attn_bias=True, max_seq_len=32)
    quick_train(tiny, tmp_path / "unsupported", steps=1, data=DATA)
    r = cli(tmp_path / "unsupported", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "no supported Hugging Face architecture" in r.stderr
    with pytest.raises(ConfigError, match="step = 7"):
        export_checkpoint(tmp_path / "unsupported", tmp_path / "o", step=7)
    with pytest.raises(ConfigError, match="dtype"):
        export_checkpoint(tmp_path / "unsupported", tmp_path / "o", dtype="int4")
    assert not (tmp_path / "o").exists()
