"""transformers loads every config.json moe-build emits, with exactly moe-cost's parameter count.

Needs the ``hf`` extra (torch CPU + transformers). Models are built on the meta device (no
memory); tiny ones also run a forward pass on CPU.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_scaling.design.builder import build
from moe_scaling.config import ModelConfig, load_model_config
from moe_scaling.costs import param_counts, published_models

from conftest import REPO

PUBLISHED = published_models()

SHAPES = {
    # the MoE family and the published models we emit (full size, meta device)
    "qwen1.5-moe-a2.7b": PUBLISHED["qwen1.5-moe-a2.7b"].config,      # qwen2_moe, gated shared expert
    "mixtral-8x7b": PUBLISHED["mixtral-8x7b"].config,                # mixtral
    "glm4-moe-dense-first": ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16,
                                        n_kv_heads=4, n_experts=32, top_k=4, d_expert=512, n_shared=2,
                                        d_shared=512, n_dense_layers=2, router="sigmoid", router_bias=True,
                                        qk_norm=False, attn_bias=True, tie_embeddings=False),
    "qwen3-moe": ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=8, n_kv_heads=2,
                             head_dim=128, n_experts=64, top_k=8, d_expert=256, router="softmax",
                             n_dense_layers=1),
    "dense-qwen3": ModelConfig(vocab_size=128256, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=8),
    "dense-llama": ModelConfig(vocab_size=32000, d_model=1024, n_layers=8, n_heads=16, qk_norm=False,
                               tie_embeddings=False, d_ff=2816),
    "dense-qwen2": ModelConfig(vocab_size=32000, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=2,
                               qk_norm=False, attn_bias=True),
}
EXPECTED_TYPE = {"qwen1.5-moe-a2.7b": "qwen2_moe", "mixtral-8x7b": "mixtral", "glm4-moe-dense-first": "glm4_moe",
                 "qwen3-moe": "qwen3_moe", "dense-qwen3": "qwen3", "dense-llama": "llama", "dense-qwen2": "qwen2"}


def hf_counts(path):
    """(total, routed-expert) parameters of the transformers model for ``path``/config.json."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())           # tied weights appear once
    routed = sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.experts\.", n))
    return config, total, routed


def assert_exact(path, cfg):
    config, total, routed = hf_counts(path)
    p = param_counts(cfg)
    costs = json.loads((path / "costs.json").read_text())
    assert total == p.total == costs["params_total"]
    assert routed == p.routed_experts                  # so active = total - routed + routed_active
    assert config.tie_word_embeddings == cfg.tie_embeddings
    return config


def test_mobilemoe_l_from_moe_build_loads_with_the_exact_count(tmp_path):
    out = tmp_path / "mobilemoe-l"
    r = subprocess.run([sys.executable, "-m", "moe_scaling.cli.build", "--active", "922M", "--total", "5.3B",
                        "--granularity", "8", "--shared", "1", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = load_model_config(out / "model.yaml")
    assert cfg == PUBLISHED["mobilemoe-l"].config
    config = assert_exact(out, cfg)
    assert config.model_type == "glm4_moe" and config.head_dim == 64
    assert config.rope_parameters["partial_rotary_factor"] == 1.0 and config.rope_parameters["rope_theta"] == 5e5
    _, total, _ = hf_counts(out)
    assert total == 5_325_706_496


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_emitted_config_loads_with_the_exact_count(tmp_path, name):
    cfg = SHAPES[name]
    summary = build(cfg, tmp_path / name)
    assert summary["model_type"] == EXPECTED_TYPE[name]
    config = assert_exact(tmp_path / name, cfg)
    assert config.model_type == EXPECTED_TYPE[name]


TINY = {
    "glm4_moe": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8,
                            top_k=2, d_expert=64, n_shared=1, d_shared=128, router="sigmoid"),
    "qwen3_moe": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8,
                             top_k=2, d_expert=64, router="softmax"),
    "qwen2_moe": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_experts=8, top_k=2,
                             d_expert=64, n_shared=1, d_shared=128, shared_gate=True, qk_norm=False,
                             router="softmax"),
    "qwen3": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_tiny_emitted_models_run_forward(tmp_path, model_type):
    cfg = TINY[model_type]
    build(cfg, tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total
    ids = torch.arange(12).reshape(1, 12) % cfg.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 12, cfg.vocab_size) and torch.isfinite(logits).all()


def test_sweet_spot_built_from_the_published_fit_loads_with_the_exact_count(tmp_path):
    out = tmp_path / "phone-2gb"
    r = subprocess.run([sys.executable, "-m", "moe_scaling.cli.build", "--fit", "fits/joint_moe_published.json",
                        "--budget-mem", "2GB", "--budget-latency", "8ms", "--device", "snapdragon-8-gen-3",
                        "--tokens", "1e12", "--out", str(out), "--json"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["binding"] == ["memory", "latency_ms"] and summary["dense"]["n_experts"] == 1
    cfg = load_model_config(out / "model.yaml")
    assert cfg.is_moe and summary["model_type"] == "glm4_moe"
    assert_exact(out, cfg)
    costs = json.loads((out / "costs.json").read_text())
    assert costs["total_bytes"] <= 2e9 and costs["decode_ms_per_token"] <= 8.0
    assert "predicted loss" in (out / "README.md").read_text()
