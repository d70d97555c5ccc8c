"""The latency model with terms that act: every profile field moves a prediction, the calibration
fits only micro-benchmark timings and recovers known costs, the call counts match the exported graph,
and the pipeline profile-host -> cache -> search on this-host -> export -> measure runs.

No test here asserts a wall-clock ratio (the machine is shared and noisy): measured / predicted of
exported models is bench/latency_model.py's job (bench/latency_model.json)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from moe_scaling.config import ModelConfig
from moe_scaling.costs import (
    DeviceProfile,
    kv_cache_bytes,
    latency_terms,
    load_device,
    matrix_calls,
    param_counts,
    roofline,
    routed_imbalance,
    small_ops,
    weight_bytes,
)
from moe_scaling.errors import ConfigError

# a measured-style profile with every field set (values of the order bench/latency_model.json finds)
HOST = DeviceProfile(name="host", description="test", memory_bandwidth=15e9, peak_ops=1.3e11, threads=1,
                     matrix_call_s=11e-6, moe_call_s=11e-6, expert_call_s=3e-6, expert_bandwidth=12e9,
                     expert_gemm_ops=9e10, expert_gemm_call_s=20e-6, run_s=6e-6, attention_call_s=10e-6,
                     kv_bandwidth=4.5e9, attention_ops=3.4e10, op_s=0.7e-6)
BASE = dict(vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)
DENSE = ModelConfig(**BASE, d_ff=704)
MOE = ModelConfig(**BASE, d_ff=704, n_experts=16, top_k=2, d_expert=64, n_shared=1, d_shared=64, router="softmax")
COARSE = ModelConfig(**BASE, d_ff=704, n_experts=4, top_k=1, d_expert=704, router="softmax")
REFERENCE = {"name", "description", "memory", "threads"}   # not fitted rates or costs (threads: routed_imbalance)


def _predictions(dev: DeviceProfile) -> list[float]:
    out = []
    for cfg in (DENSE, MOE, COARSE):
        for tokens, past in ((1, 200), (128, 0)):
            t = latency_terms(cfg, dev, tokens=tokens, past=past, kv="fp32", embeddings="fp32")
            out.append(t.total_s)
    return out


def test_every_profile_field_changes_some_prediction():
    """Double each measured field: some decode or prefill time of a dense, a fine-grained and a
    coarse MoE must move (a field that moves none is dead weight the bench would "measure")."""
    fields = {f.name for f in dataclasses.fields(DeviceProfile)} - REFERENCE
    assert fields == set(DeviceProfile.RATES) | set(DeviceProfile.SECONDS)   # a new field is listed, so tested
    base = _predictions(HOST)
    for name in sorted(fields):
        moved = _predictions(dataclasses.replace(HOST, **{name: 2 * getattr(HOST, name)}))
        assert max(abs(a / b - 1) for a, b in zip(moved, base)) > 1e-4, f"{name} changes no prediction"


def test_routed_imbalance_reproduces_the_measured_qmoe_schedule():
    """bench/qmoe_threads.json timed one QMoE node (768 -> 4 x 1024, top-1, 128 tokens) with the
    tokens sent to the experts in set counts, at 1 and 2 threads. The factor's round-robin schedule
    of experts sorted by tokens must give each case's 2-thread time relative to uniform routing:
    104/8/8/8 -> (104 + 8) / 64 = 1.75, 64/22/21/21 -> 85 / 64, one active expert -> 1 (split
    inside), 64/64 -> 1. Tolerance 6%: each ratio divides two timings whose 2-thread run-to-run range
    reaches 2.7% (the JSON's ``range_us_2t``)."""
    measured = json.loads((Path(__file__).resolve().parents[1] / "bench" / "qmoe_threads.json").read_text())
    cfg = ModelConfig(vocab_size=256, d_model=768, n_layers=1, n_heads=12, n_kv_heads=3, d_ff=1024, n_experts=4,
                      top_k=1, d_expert=1024, router="softmax")
    uniform = next(c for c in measured["skew"] if c["case"] == "uniform")["speedup_2t"]
    assert len(measured["skew"]) == 5
    for case in measured["skew"]:
        slowdown = uniform / case["speedup_2t"]
        assert routed_imbalance(cfg, 2, case["counts"]) == pytest.approx(slowdown, rel=0.06), case["case"]
    assert routed_imbalance(cfg, 2, [104, 8, 8, 8]) == pytest.approx(1.75)
    assert routed_imbalance(cfg, 1, [104, 8, 8, 8]) == 1.0            # one thread runs every expert anyway


def test_skewed_routing_slows_a_prompt_only_on_several_threads():
    """The routing enters only multi-token calls of a profile measured on more than one thread; per-layer
    rows average; bad rows are one-line errors naming the fix."""
    two = dataclasses.replace(HOST, threads=2)
    skew = [[0.85, 0.05, 0.05, 0.05]] * COARSE.n_moe_layers
    for dev, grows in ((HOST, False), (two, True)):
        plain = latency_terms(COARSE, dev, tokens=128)
        skewed = latency_terms(COARSE, dev, tokens=128, expert_load=skew)
        assert (skewed.compute_s > plain.compute_s) == grows
        assert latency_terms(COARSE, dev, tokens=1, past=100, expert_load=skew) == \
            latency_terms(COARSE, dev, tokens=1, past=100)
    half = [[0.85, 0.05, 0.05, 0.05], [0.25] * 4] * (COARSE.n_moe_layers // 2)
    assert routed_imbalance(COARSE, 2, half) == pytest.approx((1.8 + 1.0) / 2)
    for bad in ([[0.5, 0.5]], [[0.5, 0.5, 0.0, 0.0]] * 3, [[-0.1, 0.5, 0.3, 0.3]]):
        with pytest.raises(ConfigError, match="expert_load: .* per MoE layer"):
            routed_imbalance(COARSE, 2, bad)


def test_decode_terms_equal_a_hand_count():
    """One decoded token of the fine-grained MoE after 200 positions, counted by hand: 4 layers x
    (q|k|v, o, shared gate|up, shared down) = 16 matrix calls; per layer one QMoE call with 2
    experts; 4 attention calls; small nodes 4 x (2 norms + 7 QK-norm + 3 router + 3 shared SwiGLU +
    1 add) + 13 = 77."""
    assert matrix_calls(MOE) == 16 and small_ops(MOE) == 77
    t = latency_terms(MOE, HOST, tokens=1, past=200, kv="fp32", embeddings="fp32")
    fixed = 6e-6 + 16 * 11e-6 + 4 * (11e-6 + 2 * 3e-6) + 4 * 10e-6 + 77 * 0.7e-6
    assert t.fixed_s == pytest.approx(fixed, rel=1e-12)
    expert = 4 * 2 * 3 * 256 * 64 * 4.5 / 8
    kv = 2 * 4 * 2 * 64 * 200 * 4
    rest = weight_bytes(MOE, "int4", embeddings="fp32", active_only=True) - expert
    assert t.memory_s == pytest.approx(rest / 15e9 + expert / 12e9 + kv / 4.5e9, rel=1e-12)
    assert kv == kv_cache_bytes(MOE, 200, "fp32")


def test_plain_profile_is_the_roofline():
    """A vendor profile (bandwidth and peak only) gives max(bytes / B, FLOPs / P): no fixed cost."""
    dev = load_device("apple-a17-pro")
    r = roofline(MOE, dev, weights="int4", kv="int8", context=1024, prompt=1)
    read = weight_bytes(MOE, "int4", active_only=True) + kv_cache_bytes(MOE, 1024, "int8")
    assert r["overhead_ms"] == 0 and r["decode_ms_per_token"] == pytest.approx(1e3 * read / dev.memory_bandwidth)


def test_bad_profile_fields_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="expert_bandwidth = -1.0") as err:
        dataclasses.replace(HOST, expert_bandwidth=-1.0)
    assert "\n" not in str(err.value)
    (tmp_path / "x.yaml").write_text("memory_bandwidth: 1e10\npeak_ops: 1e11\nmatvec_ops: 1e10\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_device(str(tmp_path / "x.yaml"))


def _synthetic_micro(dev: DeviceProfile) -> dict:
    """Micro-benchmark timings that ``dev``'s own equations would produce (the calibration's shapes)."""
    from moe_scaling.ondevice import calibrate as c

    run = lambda call: dev.run_s + call                      # noqa: E731  (one kernel per session run)
    micro = {"threads": 1, "run": {"t_run_s": dev.run_s + dev.op_s},
             "small_op": {"d": 1024, "length": 64, "t_run_s": dev.run_s + 64 * dev.op_s}}
    micro["matrix"] = [{"K": k, "N": n, "t_run_s": run(dev.matrix_call_s + c.INT4_BYTES * k * n / dev.memory_bandwidth)}
                       for k, n in c.MATRIX_SHAPES]
    micro["matrix_prefill"] = [{"K": k, "N": n, "m": 128, "t_run_s": run(1e-6 + 2 * 128 * k * n / dev.peak_ops)}
                               for k, n in c.MATRIX_SHAPES]
    micro["qmoe"] = [{"d": d, "f": f, "E": e, "k": k, "t_run_s": run(
        dev.moe_call_s + k * dev.expert_call_s + k * 3 * d * f * c.INT4_BYTES / dev.expert_bandwidth)}
        for d, f, e, k in c.MOE_SHAPES]
    micro["qmoe_prefill"] = [{"d": d, "f": f, "E": e, "k": k, "tokens": 128, "t_run_s": run(
        dev.moe_call_s + e * (1 - (1 - k / e) ** 128) * dev.expert_gemm_call_s
        + 2 * 128 * k * 3 * d * f / dev.expert_gemm_ops)} for d, f, e, k in c.MOE_SHAPES]
    micro["attention"] = [{"past": p, "t_run_s": run(dev.attention_call_s + c._kv_bytes(p) / dev.kv_bandwidth)}
                          for p in c.CONTEXTS]
    micro["attention_prefill"] = [{"tokens": t, "t_run_s": run(
        dev.attention_call_s + 2 * t * t * c.ATTENTION["n_heads"] * c.ATTENTION["head_dim"] / dev.attention_ops)}
        for t in c.ATTENTION_PROMPTS]
    return micro


def test_calibration_recovers_the_costs_it_was_given():
    """fit_profile sees only the single-kernel timings and recovers every field to round-off."""
    from moe_scaling.ondevice.calibrate import fit_profile

    fitted = fit_profile(_synthetic_micro(HOST))
    for name in DeviceProfile.RATES + DeviceProfile.SECONDS:
        assert getattr(fitted, name) == pytest.approx(getattr(HOST, name), rel=1e-6, abs=1e-12), name


TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ff=128)


@pytest.mark.parametrize("kw", [
    {},
    dict(qk_norm=False, attn_bias=True),
    dict(n_experts=8, top_k=2, d_expert=32, n_shared=1, d_shared=32, router="softmax"),
    dict(n_experts=8, top_k=2, d_expert=32, n_shared=2, d_shared=32, shared_gate=True, router="softmax",
         n_dense_layers=1),
    dict(n_experts=8, top_k=2, d_expert=32, router="sigmoid", router_bias=True),
])
def test_call_counts_match_the_optimised_exported_graph(tmp_path, kw):
    """matrix_calls and small_ops against the graph ONNX Runtime runs (after its fusions)."""
    import onnx
    import onnxruntime as ort
    from flax import nnx

    from moe_scaling.model.transformer import Transformer
    from moe_scaling.ondevice.runtime import export_onnx

    cfg = ModelConfig(**TINY, **kw)
    export_onnx(cfg, Transformer(cfg, rngs=nnx.Rngs(0)), tmp_path)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(tmp_path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("MatMulNBits") == matrix_calls(cfg)
    assert ops.count("QMoE") == cfg.n_moe_layers and ops.count("GroupQueryAttention") == cfg.n_layers
    assert len(ops) - ops.count("MatMulNBits") - ops.count("QMoE") - ops.count("GroupQueryAttention") == small_ops(cfg)


def test_this_host_pipeline_profile_cache_search_export_measure(tmp_path, monkeypatch, capsys):
    """moe-cost --profile-host (tiny micro-benchmarks) caches this-host; a search with
    --device this-host and a latency budget returns a sweet spot whose decode time the model predicts;
    its config exported and run by ONNX Runtime decodes (its time is measured, not asserted)."""
    import time

    from conftest import REPO
    from flax import nnx

    from moe_scaling.cli.cost import main as moe_cost
    from moe_scaling.costs import host_cache_dir
    from moe_scaling.design.search import search
    from moe_scaling.design.space import ArchSpace, Budget
    from moe_scaling.laws.fit import load_fit
    from moe_scaling.model.transformer import Transformer
    from moe_scaling.ondevice.runtime import OnnxLM, export_onnx

    monkeypatch.setenv("MOE_SCALING_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="profile-host"):
        load_device("this-host")
    assert moe_cost(["--profile-host", "--threads", "1", "--profile-bytes", "2MB", "--json"]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert (host_cache_dir() / "this-host-1t.yaml").is_file() and cached["threads"] == 1
    dev = load_device("this-host")
    assert all(getattr(dev, k) is not None for k in DeviceProfile.RATES)
    space = ArchSpace(vocab_size=256, d_model_min=256, d_model_max=256, n_layers_min=4, n_layers_max=4,
                      head_dims=(64,), kv_heads=(2,), expansion_max=8)
    budget = Budget(memory=8 * 10**6, tokens=1e9, context=64, kv="fp32", embeddings="fp32", device="this-host",
                    latency_ms=50.0)
    result = search(load_fit(REPO / "fits" / "joint_moe_published.json"), budget, space, method="exhaustive")
    cfg = result.sweet_spot.config
    predicted = roofline(cfg, dev, weights="int4", kv="fp32", embeddings="fp32", context=64)["decode_ms_per_token"]
    assert result.sweet_spot.costs["decode_ms_per_token"] == pytest.approx(predicted, rel=1e-9)
    for point in result.frontier:           # the search's affine expert lines carry the measured model exactly
        assert point.decode_ms_per_token == pytest.approx(roofline(
            point.config, dev, weights="int4", kv="fp32", embeddings="fp32", context=64)["decode_ms_per_token"], rel=1e-9)
    export_onnx(cfg, Transformer(cfg, rngs=nnx.Rngs(0)), tmp_path / "spot")
    lm = OnnxLM(tmp_path / "spot", threads=1)
    _, cache = lm.prefill(np.arange(63) % 256)
    t = time.perf_counter()
    logits, _ = lm.decode(5, cache)
    assert time.perf_counter() - t > 0 and np.isfinite(logits).all()
    assert param_counts(cfg).total > 0
