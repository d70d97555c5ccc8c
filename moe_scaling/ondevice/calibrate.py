"""Measure this host's :class:`~moe_scaling.costs.DeviceProfile` from single-kernel micro-benchmarks.

Every field of a measured profile comes from graphs of *one kernel* at shapes chosen here, never
from a model's own timing (the latency model is validated out of sample on exported models,
bench/latency_model.py). Each kernel runs alone in its own session; a measurement cycles through
``R`` such sessions with distinct random weights (or caches) that together exceed the last-level
cache (``cold_bytes``, default 96 MB), so every call finds its bytes in DRAM right after another
kernel call, as a decoder's layers do (chaining ``R`` nodes in one graph instead lets the prefetcher
run from one node's weights into the next's: ~6 us a call cheaper than inside a model). Every session
of the process shares one thread pool (:func:`_global_pool`), so the measurement runs in a fresh
interpreter (:func:`micro_benchmarks`). A kernel's time is its session run's less ``run_s``; each time
is the median of ``rounds`` passes; each field a non-negative least-squares fit in relative error:

* ``run_s``, ``op_s``: session runs of a chain of 1 and of 64 small nodes on one token's ``[1, 1, d]``
  activations (SkipSimplifiedLayerNormalization, Mul, Reshape, Sigmoid, Add: the kinds between a
  decoder's matmuls; graph optimisation off so that none fuses): ``op_s`` = the difference / 63,
  ``run_s`` = the one-node run less ``op_s``.
* ``memory_bandwidth``, ``matrix_call_s``: MatMulNBits on one row (INT4 group 32, int8 activations)
  at five ``(K, N)``: ``t = matrix_call_s + bytes / memory_bandwidth``, bytes at 4.5 bits a weight.
* ``peak_ops``: the same on 128 rows: ``t = a + 2 m K N / peak_ops``.
* ``moe_call_s``, ``expert_call_s``, ``expert_bandwidth``: QMoE on one token (a fresh routing per
  call) at five ``(d, f, E, k)``: ``t = moe_call_s + k expert_call_s + k bytes_expert / expert_bandwidth``.
* ``expert_gemm_call_s``, ``expert_gemm_ops``: the same QMoE shapes on 128 tokens, each expert
  touched with probability ``1 - (1 - k/E)^128``: ``t - moe_call_s = touched expert_gemm_call_s +
  flops / expert_gemm_ops``.
* ``attention_call_s``, ``kv_bandwidth``: GroupQueryAttention (16 heads, 4 KV heads, 64 wide) on one
  new token after ``P in {32, 128, 512, 1024}`` cached ones, its past K/V fed in and present K/V
  returned (a decoder layer's cache I/O): ``t = attention_call_s + kv_bytes(P) / kv_bandwidth``.
* ``attention_ops``: the same on a ``T``-token prompt (``T`` in 128, 256): causal attention FLOPs
  ``2 T^2 h hd`` over ``t - attention_call_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_scaling.costs import DeviceProfile

__all__ = ["measure_profile", "MATRIX_SHAPES", "MOE_SHAPES", "micro_benchmarks", "fit_profile"]

INT4_BYTES = 4.5 / 8                       # bytes per weight at INT4 group 32 with fp16 scales
MATRIX_SHAPES = ((512, 512), (1024, 1024), (2048, 2048), (1024, 4096), (4096, 1024))
"""``(K, N)`` of the MatMulNBits chains (a ``(K, N)`` chain alternates ``K -> N`` and ``N -> K``)."""
MOE_SHAPES = ((1024, 160, 16, 2), (1024, 160, 16, 4), (1024, 1024, 8, 1), (1024, 512, 8, 2), (512, 64, 64, 8))
"""``(d, f, E, k)`` of the QMoE graphs."""
PREFILL_TOKENS = 128
ATTENTION = dict(n_heads=16, n_kv_heads=4, head_dim=64)
CONTEXTS = (32, 128, 512, 1024)
ATTENTION_PROMPTS = (128, 256)


def _onnx():
    import onnx
    from onnx import helper, numpy_helper
    return onnx, helper, numpy_helper


def _model(nodes, inputs, outputs, inits):
    onnx, helper, _ = _onnx()
    graph = helper.make_graph(nodes, "micro", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


_GLOBAL_THREADS: list[int] = []     # set once per process by _global_pool


def _global_pool(threads: int) -> None:
    """One intra-op thread pool of ``threads`` for every session of this process: hundreds of
    sessions with their own spinning pools would fight over the cores (fixed once per process,
    hence :func:`micro_benchmarks` runs in a fresh interpreter)."""
    from onnxruntime.capi import _pybind_state

    if _GLOBAL_THREADS and _GLOBAL_THREADS[0] != threads:
        raise RuntimeError(f"threads = {threads}: this process's pool has {_GLOBAL_THREADS[0]}; measure in a new process")
    if not _GLOBAL_THREADS:
        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_THREADS.append(threads)


def _session(model, threads: int, optimize: bool = True):
    import onnxruntime as ort

    _global_pool(threads)
    opts = ort.SessionOptions()
    opts.use_per_session_threads = False
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _median_run(sess, feeds: Sequence[dict], reps: int) -> float:
    """Median seconds of ``sess.run`` over ``reps`` runs (cycling ``feeds``) after two warm-ups."""
    for f in feeds[:2]:
        sess.run(None, f)
    times = []
    for i in range(reps):
        f = feeds[i % len(feeds)]
        t = time.perf_counter()
        sess.run(None, f)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _copies(bytes_each: float, cold_bytes: float, lo: int = 8, hi: int = 200) -> int:
    return int(min(hi, max(lo, np.ceil(cold_bytes / bytes_each))))


def _cycle(sessions: list, feeds: Sequence[dict], rounds: int) -> float:
    """Seconds per session run, cycling through ``sessions`` (each one kernel with its own weights):
    the median over ``rounds`` of one pass over all of them. Every call finds its weights out of
    cache, after another kernel call, as a decoder's layers do."""
    for i, sess in enumerate(sessions):                       # warm-up: each session runs once
        sess.run(None, feeds[i % len(feeds)])
    times = []
    for r in range(rounds):
        t = time.perf_counter()
        for i, sess in enumerate(sessions):
            sess.run(None, feeds[(i + r) % len(feeds)])
        times.append((time.perf_counter() - t) / len(sessions))
    return float(np.median(times))


def _matrix_model(k: int, n: int, m: int, rng: np.random.Generator):
    onnx, helper, nh = _onnx()
    f32 = onnx.TensorProto.FLOAT
    codes = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = np.full((n, k // 32), 1.0 / (4.6 * np.sqrt(k)), np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=32, accuracy_level=4)
    return _model([node], [helper.make_tensor_value_info("x", f32, [m, k])],
                  [helper.make_tensor_value_info("y", f32, [m, n])], [nh.from_array(codes, "b"), nh.from_array(scales, "s")])


def matrix_call(k: int, n: int, m: int, threads: int, cold_bytes: float, rounds: int,
                rng: np.random.Generator) -> tuple[float, int]:
    """``(seconds per run, R)`` of one MatMulNBits ``[m, K] x [K, N]`` (INT4 group 32, int8
    activations), cycling ``R`` sessions with distinct weights (:func:`_cycle`)."""
    r = _copies(k * n * INT4_BYTES, cold_bytes)
    sessions = [_session(_matrix_model(k, n, m, rng), threads) for _ in range(r)]
    feeds = [{"x": rng.standard_normal((m, k)).astype(np.float32)} for _ in range(4)]
    return _cycle(sessions, feeds, rounds), r


def _qmoe_model(d: int, f: int, e: int, k: int, tokens: int, rng: np.random.Generator):
    onnx, helper, nh = _onnx()
    f32 = onnx.TensorProto.FLOAT
    inits = [nh.from_array(rng.integers(0, 256, (e, 2 * f, d // 2), dtype=np.uint8), "fc1"),
             nh.from_array(np.full((e, 2 * f, d // 32), 1.0 / (4.6 * np.sqrt(d)), np.float32), "s1"),
             nh.from_array(rng.integers(0, 256, (e, d, f // 2), dtype=np.uint8), "fc2"),
             nh.from_array(np.full((e, d, f // 32), 1.0 / (4.6 * np.sqrt(f)), np.float32), "s2")]
    node = helper.make_node("QMoE", ["x", "r", "fc1", "s1", "", "fc2", "s2"], ["y"], domain="com.microsoft", k=k,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                            expert_weight_bits=4, block_size=32, accuracy_level=4)
    return _model([node], [helper.make_tensor_value_info("x", f32, [tokens, d]),
                           helper.make_tensor_value_info("r", f32, [tokens, e])],
                  [helper.make_tensor_value_info("y", f32, [tokens, d])], inits)


def qmoe_call(d: int, f: int, e: int, k: int, tokens: int, threads: int, cold_bytes: float, rounds: int,
              rng: np.random.Generator) -> tuple[float, int]:
    """``(seconds per run, R)`` of one QMoE node (top-``k`` of ``e`` experts of width ``f``) on
    ``tokens`` tokens, a fresh routing per call, cycling ``R`` sessions (:func:`_cycle`)."""
    r = _copies(e * 3 * d * f * INT4_BYTES, cold_bytes)
    sessions = [_session(_qmoe_model(d, f, e, k, tokens, rng), threads) for _ in range(r)]
    feeds = [{"x": rng.standard_normal((tokens, d)).astype(np.float32),
              "r": rng.standard_normal((tokens, e)).astype(np.float32)} for _ in range(31)]
    return _cycle(sessions, feeds, rounds), r


def _attention_model(past: int, tokens: int, rng: np.random.Generator):
    onnx, helper, nh = _onnx()
    h, kv, hd = ATTENTION["n_heads"], ATTENTION["n_kv_heads"], ATTENTION["head_dim"]
    f32 = onnx.TensorProto.FLOAT
    total = past + tokens
    ang = np.arange(total + 1)[:, None] * (1.0 / 10000 ** (np.arange(0, hd, 2) / hd))[None, :]
    inits = [nh.from_array(np.cos(ang).astype(np.float32), "cos"), nh.from_array(np.sin(ang).astype(np.float32), "sin"),
             nh.from_array(np.array([total - 1], np.int32), "seqlens"), nh.from_array(np.array(total, np.int32), "total")]
    inputs = [helper.make_tensor_value_info(n, f32, [1, tokens, w]) for n, w in (("q", h * hd), ("k", kv * hd), ("v", kv * hd))]
    inputs += [helper.make_tensor_value_info(n, f32, [1, kv, past, hd]) for n in ("pk", "pv")]
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in ("o", "k_out", "v_out")]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total", "cos", "sin"],
                            ["o", "k_out", "v_out"], domain="com.microsoft", num_heads=h, kv_num_heads=kv, do_rotary=1,
                            rotary_interleaved=0)
    return _model([node], inputs, outputs, inits)


def attention_call(past: int, tokens: int, threads: int, cold_bytes: float, rounds: int,
                   rng: np.random.Generator) -> tuple[float, int]:
    """``(seconds per run, R)`` of one GroupQueryAttention node (:data:`ATTENTION`'s heads) on
    ``tokens`` new tokens after ``past`` cached ones, its past K/V fed in and present K/V returned
    (a decoder layer's cache I/O), cycling ``R`` sessions each with its own cache (:func:`_cycle`)."""
    h, kv, hd = ATTENTION["n_heads"], ATTENTION["n_kv_heads"], ATTENTION["head_dim"]
    r = _copies(max(_kv_bytes(past), 1.0), cold_bytes, hi=64)
    sessions = [_session(_attention_model(past, tokens, rng), threads) for _ in range(r)]
    feeds = []
    for _ in range(r):
        feed = {n: rng.standard_normal((1, tokens, w)).astype(np.float32)
                for n, w in (("q", h * hd), ("k", kv * hd), ("v", kv * hd))}
        feed.update({n: rng.standard_normal((1, kv, past, hd)).astype(np.float32) for n in ("pk", "pv")})
        feeds.append(feed)
    return _cycle(sessions, feeds, rounds), r


def small_op_chain(d: int, length: int, threads: int, reps: int, rng: np.random.Generator) -> float:
    """Seconds per run of a ``length``-node chain of small ops on ``[1, 1, d]``, unfused."""
    onnx, helper, nh = _onnx()
    f32 = onnx.TensorProto.FLOAT
    inits = [nh.from_array(np.ones(d, np.float32), "gamma"), nh.from_array(np.full((1, 1, d), 0.5, np.float32), "c"),
             nh.from_array(np.array([1, 1, d], np.int64), "shape")]
    nodes, x = [], "x"
    for i in range(length):
        y = f"n{i}"
        kind = i % 5
        if kind == 0:
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, "c", "gamma"], [y],
                                          domain="com.microsoft", epsilon=1e-6))
        elif kind == 1:
            nodes.append(helper.make_node("Mul", [x, "c"], [y]))
        elif kind == 2:
            nodes.append(helper.make_node("Reshape", [x, "shape"], [y]))
        elif kind == 3:
            nodes.append(helper.make_node("Sigmoid", [x], [y]))
        else:
            nodes.append(helper.make_node("Add", [x, "c"], [y]))
        x = y
    used = {i for n in nodes for i in n.input}
    sess = _session(_model(nodes, [helper.make_tensor_value_info("x", f32, [1, 1, d])],
                           [helper.make_tensor_value_info(x, f32, [1, 1, d])],
                           [t for t in inits if t.name in used]), threads, optimize=False)
    return _median_run(sess, [{"x": rng.standard_normal((1, 1, d)).astype(np.float32)}], reps)


def micro_benchmarks(threads: int, *, cold_bytes: float = 96e6, rounds: int = 5) -> dict:
    """Every micro-benchmark's raw timings at ``threads`` (what :func:`fit_profile` fits), measured
    in a fresh Python process (its sessions share one thread pool of ``threads``)."""
    cmd = [sys.executable, "-m", "moe_scaling.ondevice.calibrate", "--threads", str(threads),
           "--cold-bytes", str(cold_bytes), "--rounds", str(rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
    if done.returncode != 0:
        raise RuntimeError(f"micro-benchmarks at threads = {threads} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _micro_benchmarks(threads: int, *, cold_bytes: float = 96e6, rounds: int = 5) -> dict:
    """:func:`micro_benchmarks` in this process (which must not have made a session yet)."""
    rng = np.random.default_rng(0)
    say = lambda s: print(s, file=sys.stderr, flush=True)                  # noqa: E731
    out: dict = {"threads": threads, "cold_bytes": cold_bytes, "rounds": rounds,
                 "matrix": [], "matrix_prefill": [], "qmoe": [], "qmoe_prefill": [], "attention": [],
                 "attention_prefill": []}
    out["run"] = {"t_run_s": small_op_chain(1024, 1, threads, 400, rng)}
    out["small_op"] = {"d": 1024, "length": 64, "t_run_s": small_op_chain(1024, 64, threads, 200, rng)}
    for k, n in MATRIX_SHAPES:
        t, r = matrix_call(k, n, 1, threads, cold_bytes, rounds, rng)
        out["matrix"].append({"K": k, "N": n, "copies": r, "t_run_s": t})
        t, r = matrix_call(k, n, PREFILL_TOKENS, threads, cold_bytes / 8, 2, rng)
        out["matrix_prefill"].append({"K": k, "N": n, "m": PREFILL_TOKENS, "copies": r, "t_run_s": t})
        say(f"matrix {k}x{n}")
    for d, f, e, k in MOE_SHAPES:
        t, r = qmoe_call(d, f, e, k, 1, threads, cold_bytes, rounds, rng)
        out["qmoe"].append({"d": d, "f": f, "E": e, "k": k, "copies": r, "t_run_s": t})
        t, r = qmoe_call(d, f, e, k, PREFILL_TOKENS, threads, cold_bytes / 8, 2, rng)
        out["qmoe_prefill"].append({"d": d, "f": f, "E": e, "k": k, "tokens": PREFILL_TOKENS, "copies": r, "t_run_s": t})
        say(f"qmoe d{d} f{f} E{e} k{k}")
    for past in CONTEXTS:
        t, r = attention_call(past, 1, threads, cold_bytes, rounds, rng)
        out["attention"].append({"past": past, "copies": r, "t_run_s": t})
    for tokens in ATTENTION_PROMPTS:
        t, r = attention_call(0, tokens, threads, 0.0, 2, rng)
        out["attention_prefill"].append({"tokens": tokens, "copies": r, "t_run_s": t})
    say("attention")
    return out


def _lstsq(a, b) -> np.ndarray:
    """Non-negative least squares in relative error (each row divided by its time): the validation
    judges measured / predicted, so a 20 us call weighs as much as a 2 ms one, and no cost is
    negative (at 2 threads QMoE runs a token's experts side by side: a second expert can cost
    nothing beyond its bytes, and the fit then says ``expert_call_s = 0``)."""
    from scipy.optimize import nnls

    a, b = np.asarray(a, float), np.asarray(b, float)
    return nnls(a / b[:, None], np.ones_like(b))[0]


def _kv_bytes(past: int) -> float:
    """Bytes of one layer's fp32 K and V cache at ``past`` positions (the calibration's heads)."""
    return 2 * ATTENTION["n_kv_heads"] * ATTENTION["head_dim"] * past * 4.0


def fit_profile(micro: dict, name: str = "this-host", description: str = "") -> DeviceProfile:
    """The profile the module docstring's fits give from :func:`micro_benchmarks`' timings (every
    kernel's time is its session run's less ``run_s``)."""
    chain, one = micro["small_op"], micro["run"]["t_run_s"]
    op = (chain["t_run_s"] - one) / (chain["length"] - 1)
    run = max(one - op, 0.0)
    call = lambda m: m["t_run_s"] - run                                     # noqa: E731
    mx = micro["matrix"]
    matrix_call, inv_bw = _lstsq([[1.0, INT4_BYTES * m["K"] * m["N"]] for m in mx], [call(m) for m in mx])
    mp = micro["matrix_prefill"]
    _, inv_peak = _lstsq([[1.0, 2.0 * m["m"] * m["K"] * m["N"]] for m in mp], [call(m) for m in mp])
    q = micro["qmoe"]
    moe_call, expert_call, inv_ebw = _lstsq([[1.0, m["k"], m["k"] * 3 * m["d"] * m["f"] * INT4_BYTES] for m in q],
                                            [call(m) for m in q])
    qp = micro["qmoe_prefill"]
    touched = [m["E"] * (1 - (1 - m["k"] / m["E"]) ** m["tokens"]) for m in qp]
    flops = [2.0 * m["tokens"] * m["k"] * 3 * m["d"] * m["f"] for m in qp]
    expert_gemm_call, inv_egemm = _lstsq([[u, fl] for u, fl in zip(touched, flops)],
                                         [call(m) - moe_call for m in qp])
    at = micro["attention"]
    attention_call, inv_kv = _lstsq([[1.0, _kv_bytes(m["past"])] for m in at], [call(m) for m in at])
    h, hd = ATTENTION["n_heads"], ATTENTION["head_dim"]
    ap = micro["attention_prefill"]
    aflops = [2.0 * m["tokens"] ** 2 * h * hd for m in ap]                  # causal: QK^T and PV, halved
    arest = [call(m) - attention_call for m in ap]
    attention_ops = float(np.dot(aflops, aflops) / np.dot(aflops, arest))
    fields = dict(memory_bandwidth=1.0 / inv_bw, peak_ops=1.0 / inv_peak, matrix_call_s=matrix_call,
                  moe_call_s=moe_call, expert_call_s=expert_call, expert_bandwidth=1.0 / inv_ebw,
                  expert_gemm_ops=1.0 / inv_egemm, expert_gemm_call_s=expert_gemm_call, run_s=run, attention_call_s=attention_call,
                  kv_bandwidth=1.0 / inv_kv, attention_ops=attention_ops, op_s=op)
    fields = {key: float(value) for key, value in fields.items()}     # DeviceProfile checks each one's sign
    return DeviceProfile(name=name, description=description or f"measured: ONNX Runtime CPU kernels at "
                         f"{micro['threads']} thread(s) (moe_scaling.ondevice.calibrate)",
                         threads=micro["threads"], **fields)


def measure_profile(threads: int, *, cold_bytes: float = 96e6, rounds: int = 5,
                    name: str = "this-host") -> tuple[DeviceProfile, dict]:
    """``(profile, raw timings)`` of this host at ``threads`` (:func:`micro_benchmarks`, :func:`fit_profile`)."""
    micro = micro_benchmarks(threads, cold_bytes=cold_bytes, rounds=rounds)
    return fit_profile(micro, name=name), micro


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="raw micro-benchmark timings as one JSON line (used by micro_benchmarks)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--cold-bytes", type=float, default=96e6)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    print(json.dumps(_micro_benchmarks(args.threads, cold_bytes=args.cold_bytes, rounds=args.rounds)))


if __name__ == "__main__":
    main()
