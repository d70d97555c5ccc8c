"""The cost model against hand counts, published totals and the invariants it must keep."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.costs import flops_per_token, kv_cache_bytes, load_device, param_counts, published_models, roofline, weight_bytes
from moe_scaling.units import parse_bytes, parse_count, parse_precision

# A tiny MoE counted by hand below.
TINY = ModelConfig(vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                   n_experts=4, top_k=2, d_expert=16, n_shared=1, d_shared=8, n_dense_layers=1,
                   tie_embeddings=True, qk_norm=True)


def test_tiny_moe_hand_count():
    # head_dim 4; per layer: q 8*8, k 8*4, v 8*4, o 8*8 = 192; qk-norm gains 4+4 = 8
    attention = 2 * (192 + 8)
    norms = 2 * 2 * 8 + 8                        # two gains per block + final norm
    dense = 1 * 3 * 8 * 32                       # layer 0 is dense, width d_ff
    router = 1 * 8 * 4                           # one MoE layer
    routed = 4 * 3 * 8 * 16
    shared = 3 * 8 * 8
    embedding = 100 * 8                          # tied: once
    p = param_counts(TINY)
    assert p.total == embedding + attention + norms + dense + router + routed + shared == 3768
    assert p.active == embedding + attention + norms + dense + router + 2 * 3 * 8 * 16 + shared == 3000
    assert p.embedding == 800 and p.non_embedding_total == 2968


def test_untied_embeddings_count_twice_and_biases_and_gates_count():
    base = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, d_ff=8, n_experts=2, top_k=1,
                n_shared=1, qk_norm=False)
    tied = param_counts(ModelConfig(**base))
    untied = param_counts(ModelConfig(**base, tie_embeddings=False))
    assert untied.total - tied.total == 10 * 4
    bias = param_counts(ModelConfig(**base, attn_bias=True))
    assert bias.total - tied.total == 3 * 4           # q, k, v biases of width heads * head_dim
    gated = param_counts(ModelConfig(**base, shared_gate=True))
    assert gated.total - tied.total == 4 and gated.active - tied.active == 4
    sig = param_counts(ModelConfig(**base, router="sigmoid", router_bias=True))
    assert sig.total == tied.total                    # the selection bias is a buffer


def test_tiny_flops_by_hand():
    # forward: 2 * active matmul weights (attention 2*192, dense 768, routed active 2*384, shared 192)
    # + router 2*8*4 + attention 2*2*2*context*2*4 / 2 + LM head 2*8*100
    ctx = 16
    matmul = 2 * 192 + 768 + 2 * 384 + 192
    expected = 2 * matmul + 2 * 8 * 4 + 2 * 2 * 2 * ctx * 2 * 4 / 2 + 2 * 8 * 100
    assert flops_per_token(TINY, ctx) == expected
    assert flops_per_token(TINY, ctx, training=True) == 3 * expected
    assert flops_per_token(TINY, ctx, causal=False) == expected + 2 * 2 * 2 * ctx * 2 * 4 / 2


@pytest.mark.parametrize("name", ["mobilemoe-l", "mixtral-8x7b", "qwen1.5-moe-a2.7b"])
def test_published_models_within_one_percent(name):
    """Published counts are rounded to 2-3 significant digits ("5.3B": +-0.05B, 0.9%), so 1% is the
    rounding of the published figure, not a fitted margin."""
    m = published_models()[name]
    p = param_counts(m.config)
    assert p.total == pytest.approx(m.params_total, rel=0.01)
    assert p.active == pytest.approx(m.params_active, rel=0.01)


def test_olmoe_matches_its_published_rounded_figures():
    """OLMoE publishes 6.9B total and 1.3B active. The exact count of its architecture is
    6,919,100,416 / 1,281,955,840: the total is within 1%, and the active count rounds to the
    published 1.3B at the one decimal it was published with (1.28B is 1.4% under 1.3B, a rounding
    effect, not a counting one: attention 268.4M + 8 of 64 experts 805.3M + embeddings 206.0M)."""
    m = published_models()["olmoe-1b-7b"]
    p = param_counts(m.config)
    assert p.total == pytest.approx(6.9e9, rel=0.01)
    assert round(p.active / 1e9, 1) == 1.3
    assert p.active == 16 * (4 * 2048 * 2048 + 8 * 3 * 2048 * 1024 + 2048 * 64 + 2 * 128 + 2 * 2048) \
        + 2 * 50304 * 2048 + 2048


def test_mobilemoe_l_exact():
    p = param_counts(published_models()["mobilemoe-l"].config)
    assert (p.total, p.active) == (5_325_706_496, 921_687_296)


# -- properties ------------------------------------------------------------------------------

@st.composite
def moe_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))
    d_model = heads * draw(st.sampled_from([8, 16, 32]))
    n_experts = draw(st.integers(1, 32))
    return ModelConfig(vocab_size=draw(st.integers(16, 5000)), d_model=d_model,
                       n_layers=draw(st.integers(1, 6)), n_heads=heads, n_kv_heads=kv,
                       d_ff=draw(st.sampled_from([64, 128, 256])), n_experts=n_experts,
                       top_k=draw(st.integers(1, n_experts)), d_expert=draw(st.sampled_from([16, 32, 64])),
                       n_shared=draw(st.integers(0, 2)), tie_embeddings=draw(st.booleans()),
                       shared_gate=draw(st.booleans()), attn_bias=draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(moe_configs())
def test_active_never_exceeds_total(cfg):
    p = param_counts(cfg)
    assert 0 < p.active <= p.total
    assert p.embedding < p.total
    assert weight_bytes(cfg, "int4", active_only=True) <= weight_bytes(cfg, "bf16", active_only=True)


@settings(max_examples=100, deadline=None)
@given(moe_configs(), st.sampled_from([2, 4, 8]))
def test_granularity_keeps_active_params_and_flops(cfg, g):
    if not cfg.is_moe or cfg.d_expert % g:
        return
    # fine-grained twin: g times the experts, each 1/g as wide, g times the top-k
    fine = ModelConfig.from_dict({**cfg.to_dict(), "n_experts": cfg.n_experts * g,
                                  "top_k": cfg.top_k * g, "d_expert": cfg.d_expert // g})
    a, b = param_counts(cfg), param_counts(fine)
    router_delta = cfg.n_moe_layers * cfg.d_model * (fine.n_experts - cfg.n_experts)
    assert b.active - b.router == a.active - a.router
    assert b.total - a.total == router_delta
    assert flops_per_token(fine, 64) - flops_per_token(cfg, 64) == 2 * router_delta


@settings(max_examples=100, deadline=None)
@given(moe_configs(), st.sampled_from(["d_model", "d_ff", "d_expert", "n_experts", "n_layers",
                                       "vocab_size", "n_shared", "d_shared"]))
def test_counts_monotone_in_every_width(cfg, field):
    d = cfg.to_dict()
    if field == "d_model":
        d["d_model"] = cfg.d_model + cfg.n_heads
        d["head_dim"] = None
    else:
        d[field] = (d[field] or 0) + (1 if field in ("n_experts", "n_layers", "n_shared") else 8)
    if field == "d_shared" and not cfg.n_shared:
        return
    if field in ("n_experts", "d_expert") and not cfg.is_moe:
        return   # one more expert turns a dense FFN into an MoE: a change of kind, not of width
    bigger = ModelConfig.from_dict(d)
    a, b = param_counts(cfg), param_counts(bigger)
    assert b.total >= a.total and b.active >= a.active
    assert flops_per_token(bigger, 128) >= flops_per_token(cfg, 128)


# -- bytes ---------------------------------------------------------------------------------------

def test_int4_group32_fp16_is_4_5_bits():
    assert parse_precision("int4").bits_per_value == 4.5
    assert parse_precision("int4-g64").bits_per_value == 4.25
    assert parse_precision("int8-g32-fp32").bits_per_value == 9.0
    assert parse_precision("bf16").bits_per_value == 16


def test_weight_bytes_by_hand():
    p = param_counts(TINY)
    vectors = 2 * 8 + p.norms          # qk-norm gains + RMSNorm gains, bf16; int8 = 8 + 16/32 bits
    matmul = p.total - p.embedding - p.router - vectors
    expected = (matmul * 4.5 + p.embedding * 8.5 + p.router * 16 + vectors * 16) / 8
    assert weight_bytes(TINY, "int4", embeddings="int8") == expected
    assert weight_bytes(TINY, "bf16") == 2 * p.total


def test_kv_cache_bytes_by_hand():
    # 2 (K,V) * layers * kv heads * head_dim * context
    assert kv_cache_bytes(TINY, 1000, "bf16") == 2 * 2 * 1 * 4 * 1000 * 2
    assert kv_cache_bytes(TINY, 1000, "int8") == 2 * 2 * 1 * 4 * 1000 + 2 * 2 * 1 * 1000 * 2
    mobile = published_models()["mobilemoe-l"].config
    assert kv_cache_bytes(mobile, 4096, "bf16") == 2 * 32 * 4 * 64 * 4096 * 2


@pytest.mark.parametrize("text, value", [("2GB", 2_000_000_000), ("1.5GiB", 1_610_612_736),
                                         ("800MB", 800_000_000), ("2e9", 2_000_000_000),
                                         ("512 MiB", 536_870_912), ("1024", 1024), ("0.5KB", 500)])
def test_parse_bytes_exact(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["2gb", "2 G", "GB", "", "-1GB", "0", "1.5", "two GB", "2GBs",
                                  "nan", "inf", "2 PB", "1,5GB"])
def test_parse_bytes_rejects_malformed(text):
    with pytest.raises(ConfigError) as err:
        parse_bytes(text, field="--budget-mem")
    assert str(err.value).startswith("--budget-mem") and "\n" not in str(err.value)


def test_parse_count():
    assert parse_count("0.9B") == 9e8 and parse_count("300M") == 3e8 and parse_count("1e12") == 1e12
    with pytest.raises(ConfigError):
        parse_count("0.9 billion")


# -- roofline ----------------------------------------------------------------------------------

def test_decode_is_memory_bound_and_matches_the_formula():
    cfg = published_models()["mobilemoe-l"].config
    dev = load_device("apple-a17-pro")
    r = roofline(cfg, dev, weights="int4", kv="int8", context=4096)
    read = weight_bytes(cfg, "int4", active_only=True) + kv_cache_bytes(cfg, 4096, "int8")
    assert r["decode_bound"] == "memory"
    assert r["decode_ms_per_token"] == pytest.approx(1e3 * read / dev.memory_bandwidth)
    long_prompt = roofline(cfg, dev, context=4096, prompt=4096)
    assert long_prompt["prefill_ms"] == pytest.approx(
        1e3 * 4096 * flops_per_token(cfg, 4096) / dev.peak_ops)


def test_a_measured_profile_from_yaml_adds_fixed_costs_per_call(tmp_path):
    """A measured profile (moe-cost --profile-host) read from YAML: decode = the bytes of each class at
    its bandwidth + fixed costs per call; the counts here by hand (16 layers, 2 dense: q|k|v and o
    per layer, gate|up and down per dense layer and per MoE layer's shared expert = 64 matrix calls;
    14 QMoE calls with 2 experts each)."""
    cfg = ModelConfig(vocab_size=256, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, d_ff=2816, n_experts=16,
                      top_k=2, d_expert=160, n_shared=1, d_shared=160, n_dense_layers=2)
    (tmp_path / "host.yaml").write_text("memory_bandwidth: 2.0e10\npeak_ops: 8.0e10\nmatrix_call_s: 1.0e-5\n"
                                        "moe_call_s: 2.0e-5\nexpert_call_s: 3.0e-6\nrun_s: 5.0e-6\n")
    dev = load_device(str(tmp_path / "host.yaml"))
    assert (dev.matrix_call_s, dev.moe_call_s, dev.expert_call_s, dev.run_s) == (1e-5, 2e-5, 3e-6, 5e-6)
    r = roofline(cfg, dev, weights="int4", kv="fp32", context=144, prompt=1)
    memory = (weight_bytes(cfg, "int4", active_only=True) + kv_cache_bytes(cfg, 144, "fp32")) / 2e10
    fixed = 5e-6 + 64 * 1e-5 + 14 * (2e-5 + 2 * 3e-6)
    assert r["decode_bound"] == "memory" and r["overhead_ms"] == pytest.approx(1e3 * fixed)
    assert r["decode_ms_per_token"] == pytest.approx(1e3 * (memory + fixed))
    # without the measured fields the same profile is the plain roofline
    (tmp_path / "plain.yaml").write_text("memory_bandwidth: 2.0e10\npeak_ops: 8.0e10\n")
    plain = roofline(cfg, load_device(str(tmp_path / "plain.yaml")), weights="int4", kv="fp32", context=144, prompt=1)
    assert plain["overhead_ms"] == 0 and plain["decode_ms_per_token"] == pytest.approx(1e3 * memory)


def test_unknown_device_is_an_error():
    with pytest.raises(ConfigError, match="unknown; use one of"):
        load_device("pixel-99")


# -- the CLI ----------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_scaling.cli.cost", *args],
                          capture_output=True, text=True)


def test_cli_json_and_table(tmp_path):
    out = _cli("mobilemoe-l", "--device", "snapdragon-8-gen-3", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["params_total"] == 5_325_706_496 and data["params_active"] == 921_687_296
    for key in ("params_embedding", "flops_per_token_forward", "weight_bytes", "kv_cache_bytes",
                "decode_ms_per_token", "prefill_ms"):
        assert data[key] > 0
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
                              "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "intermediate_size": 14336,
                              "num_local_experts": 8, "num_experts_per_tok": 2,
                              "tie_word_embeddings": False}))
    table = _cli(str(hf), "--weights", "bf16")
    assert table.returncode == 0 and "46.7B  (46,702,792,704)" in table.stdout


@pytest.mark.parametrize("args, needle", [
    (("mobilemoe-l", "--weights", "int3x"), "weights = 'int3x'"),
    (("mobilemoe-l", "--device", "nokia"), "device = 'nokia'"),
    (("missing.yaml",), "no such file"),
    (("mobilemoe-l", "--context", "0"), "--context"),
    (("mobilemoe-l", "--prompt", "-3", "--device", "apple-a17-pro"), "--prompt = -3"),
    (("mobilemoe-l", "--context", "many"), "invalid int value"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle):
    out = _cli(*args)
    assert out.returncode == 2
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
