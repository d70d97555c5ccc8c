"""ModelConfig / TrainConfig / DataConfig: defaults, derived sparsity vocabulary, validation, files."""

import json
import os
import subprocess
import sys

import pytest

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig, load_config, load_model_config, save_config
from moe_scaling.hf.config import from_hf_config, read_model_config
from moe_scaling.errors import ConfigError

BASE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4)


def test_defaults_resolve():
    m = ModelConfig(**BASE)
    assert (m.n_kv_heads, m.head_dim, m.d_ff, m.d_expert, m.d_shared) == (4, 16, 256, 256, 256)
    assert not m.is_moe and m.granularity == 1 and m.expansion == 1 and m.sparsity == 0


def test_sparsity_vocabulary_matches_design_definitions():
    # MobileMoE-L: d_ff 5120, 60 experts of 640, top-4, 1 shared
    m = ModelConfig(vocab_size=128256, d_model=1280, n_layers=32, n_heads=20, n_kv_heads=4,
                    head_dim=64, d_ff=5120, n_experts=60, top_k=4, d_expert=640, n_shared=1,
                    d_shared=2560)
    assert m.granularity == 8.0            # 5120 / 640
    assert m.expansion == 60 / 8           # n_experts / G
    assert m.sparsity == pytest.approx(1 - 4 / 60)
    assert m.activation_ratio == pytest.approx(5 / 61)
    assert m.d_active_ffn == 4 * 640 + 2560


def test_granularity_key_splits_experts_at_fixed_active_width():
    """``granularity`` means the same in a run file as in a grid file: d_expert = d_ff / G and the
    written top_k (the coarse one) is multiplied by G, so the active FFN width does not change."""
    coarse = ModelConfig.from_dict({**BASE, "d_ff": 256, "n_experts": 4, "top_k": 1, "n_shared": 1})
    m = ModelConfig.from_dict({**BASE, "d_ff": 256, "n_experts": 16, "top_k": 1, "n_shared": 1, "granularity": 4})
    assert (m.d_expert, m.top_k, m.d_shared) == (64, 4, 256)
    assert m.granularity == 4 and m.expansion == 4
    assert m.d_active_ffn == coarse.d_active_ffn == 512


def test_granularity_means_the_same_in_run_and_grid_files(tmp_path):
    from moe_scaling.sweep.grid import expand_grid, load_grid

    model = {**BASE, "d_ff": 256, "n_experts": 16, "top_k": 2, "n_shared": 1, "granularity": 2}
    (tmp_path / "g.yaml").write_text(
        "name: g\ndata: {corpus: stdlib}\n"
        f"model: {{vocab_size: {BASE['vocab_size']}, d_model: {BASE['d_model']}, n_layers: {BASE['n_layers']}, "
        f"n_heads: {BASE['n_heads']}, d_ff: 256, n_experts: 16, top_k: 2, n_shared: 1}}\n"
        "grid: {granularity: [2]}\n")
    [run] = expand_grid(load_grid(tmp_path / "g.yaml"), check_corpus=False)
    assert run.model == ModelConfig.from_dict(model)


def test_dense_twin_has_equal_active_width():
    m = ModelConfig(**BASE, d_ff=256, n_experts=8, top_k=2, d_expert=64, n_shared=1, d_shared=32)
    twin = m.dense_twin()
    assert not twin.is_moe and twin.d_ff == 2 * 64 + 32


@pytest.mark.parametrize("override, field", [
    ({"d_model": 0}, "model.d_model"),
    ({"n_layers": -2}, "model.n_layers"),
    ({"vocab_size": 1.5}, "model.vocab_size"),
    ({"n_kv_heads": 3}, "model.n_kv_heads"),
    ({"n_heads": 5}, "model.n_heads"),                 # 64 % 5 != 0 without explicit head_dim
    ({"n_experts": 8, "top_k": 9}, "model.top_k"),
    ({"n_experts": 8, "top_k": 0}, "model.top_k"),
    ({"n_shared": -1}, "model.n_shared"),
    ({"n_dense_layers": 3}, "model.n_dense_layers"),
    ({"router": "relu"}, "model.router"),
    ({"qk_norm": "yes"}, "model.qk_norm"),
    ({"rope_theta": 0}, "model.rope_theta"),
    ({"router_bias": True}, "model.router_bias"),      # needs a sigmoid router
    ({"d_ff": 256, "n_experts": 8, "granularity": 3}, "model.granularity"),
    ({"d_ff": 256, "n_experts": 8, "granularity": 2.5}, "model.granularity"),
    ({"top_kk": 2}, "model.top_kk"),
])
def test_model_validation_names_field_value_and_fix(override, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**BASE, **override})
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg and ";" in msg


def test_unknown_field_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean 'top_k'"):
        ModelConfig.from_dict({**BASE, "topk": 2})


def test_explicit_head_dim_may_differ_from_d_model_over_heads():
    m = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=5, head_dim=32)
    assert m.head_dim * m.n_heads == 160


@pytest.mark.parametrize("section, data, field", [
    (TrainConfig, {"lr": -1.0}, "train.lr"),
    (TrainConfig, {"schedule": "linear"}, "train.schedule"),
    (TrainConfig, {"dispatch": "fast"}, "train.dispatch"),
    (TrainConfig, {"batch_size": 0}, "train.batch_size"),
    (TrainConfig, {"epochs": 3}, "train.epochs"),
    (DataConfig, {"seq_len": 1}, "data.seq_len"),
    (DataConfig, {"valid_fraction": 0.9}, "data.valid_fraction"),
    (DataConfig, {"tokenizer": "bpe"}, "data.tokenizer"),
])
def test_train_and_data_validation(section, data, field):
    with pytest.raises(ConfigError) as err:
        section.from_dict(data)
    assert str(err.value).startswith(field)


def test_train_steps_from_token_budget():
    assert TrainConfig(tokens=100_000, batch_size=8).steps(128) == 100_000 // (8 * 128)
    with pytest.raises(ConfigError, match="train.tokens"):
        TrainConfig(tokens=100, batch_size=8).steps(128)
    assert TrainConfig.from_dict({"tokens": 1e6}).tokens == 1_000_000


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    m = ModelConfig(**BASE, d_ff=256, n_experts=8, top_k=2, d_expert=64, n_shared=1, router="sigmoid")
    t, d = TrainConfig(tokens=12345, lr=1e-3), DataConfig(corpus="stdlib", seq_len=64)
    path = tmp_path / f"run{suffix}"
    save_config(path, m, t, d)
    assert load_config(path) == (m, t, d)
    assert load_model_config(path) == m
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # a normal file's mode, not mkstemp's 0600


def test_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    extra = tmp_path / "extra.yaml"
    extra.write_text("model: {vocab_size: 256, d_model: 64, n_layers: 1, n_heads: 4}\noptim: {}\n")
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        load_config(extra)


# -- Hugging Face import -------------------------------------------------------------------

HF = {
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, intermediate_size=5632,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                      num_experts_per_tok=4, norm_topk_prob=False, tie_word_embeddings=False),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      norm_topk_prob=True, tie_word_embeddings=False),
    "olmoe": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024, num_experts=64,
                  num_experts_per_tok=8, tie_word_embeddings=False),
    "granitemoe": dict(model_type="granitemoe", vocab_size=49155, hidden_size=1024, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=8, intermediate_size=512,
                       num_local_experts=32, num_experts_per_tok=8, tie_word_embeddings=True),
    "glm4_moe": dict(model_type="glm4_moe", vocab_size=151552, hidden_size=4096, num_hidden_layers=46,
                     num_attention_heads=96, num_key_value_heads=8, head_dim=128, intermediate_size=10944,
                     moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8,
                     n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=False),
    "llama": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                  tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                  tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                  tie_word_embeddings=True),
}


def test_hf_import_maps_every_supported_family():
    got = {k: from_hf_config(v) for k, v in HF.items()}
    assert got["mixtral"].n_experts == 8 and got["mixtral"].top_k == 2 and not got["mixtral"].tie_embeddings
    q = got["qwen2_moe"]
    assert (q.granularity, q.n_shared, q.d_shared, q.shared_gate, q.attn_bias) == (4.0, 1, 5632, True, True)
    assert got["qwen3_moe"].qk_norm and got["qwen3_moe"].head_dim == 128 and got["qwen3_moe"].n_shared == 0
    assert got["olmoe"].norm_topk is False and got["olmoe"].qk_norm
    g = got["glm4_moe"]
    assert (g.router, g.router_bias, g.n_dense_layers, g.n_shared, g.d_shared) == ("sigmoid", True, 1, 1, 1408)
    assert not got["llama"].is_moe and got["llama"].d_ff == 8192 and got["llama"].tie_embeddings
    assert got["qwen2"].attn_bias and not got["qwen2"].qk_norm and got["qwen3"].qk_norm


def test_hf_leading_dense_layers_import_and_interleaved_ones_are_refused():
    cfg = from_hf_config({**HF["qwen3_moe"], "mlp_only_layers": [0, 1]})
    assert cfg.n_dense_layers == 2 and cfg.d_ff == 6144
    with pytest.raises(ConfigError, match="mlp_only_layers = \\[0, 2\\]"):
        from_hf_config({**HF["qwen3_moe"], "mlp_only_layers": [0, 2]})
    with pytest.raises(ConfigError, match="decoder_sparse_step 2"):
        from_hf_config({**HF["qwen2_moe"], "decoder_sparse_step": 2})


def test_hf_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ConfigError, match="model_type = 'gpt2'.*mixtral.*qwen2_moe"):
        from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="num_local_experts"):
        from_hf_config({k: v for k, v in HF["mixtral"].items() if k != "num_local_experts"})


def test_read_model_config_reads_hf_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF["olmoe"]))
    assert read_model_config(path).n_experts == 64
    # our own loader reads only our format, and says where HF files are read
    with pytest.raises(ConfigError, match="read_model_config"):
        load_model_config(path)


def test_package_imports_without_jax_side_effects():
    # config must stay importable by every later stage without pulling the model code in
    out = subprocess.run([sys.executable, "-c", "import sys, moe_scaling.config, moe_scaling.costs;"
                          "print('jax' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
