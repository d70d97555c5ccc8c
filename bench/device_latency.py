"""Measured batch-1 latency of exported models on this CPU beside the cost model's roofline.

    python bench/device_latency.py --json          # writes bench/device_latency.json (~30 min on 2 cores: training ~20)
    python bench/device_latency.py --dir /tmp/dl   # keep the trained runs and exports; a rerun reuses them

The paper's headline, side by side: a dense decoder and an MoE of about equal INT4 weight memory
(~100 MB each: the same attention; the MoE's FFN is 16 fine-grained routed experts, top-2, plus one
shared expert, 2.7x fewer active parameters), each trained briefly on tinyshakespeare (byte tokens),
exported with ``moe-export --runtime onnx`` (INT4 group-32 weights, int8 dynamic activations, the
routed experts in ONNX Runtime's QMoE kernel) and run by ONNX Runtime on this CPU: prefill of 128
and 512 tokens (best of 3 after a warm-up) and decode (median of 32 tokens after a 128-token
prompt), at 1 and 2 threads, the two models interleaved.

The host profile, per thread count: ``plain_roofline_*`` use a vendor-style profile (memory
bandwidth from a copy benchmark: NumPy copies of 256 MB per thread, bytes read + written over the
slowest thread's time, best of 5; the matmul peak of the runtime's own INT4 kernel, MatMulNBits
512 x 2048 x 2048, int8 activations, best of 5); ``predicted_*`` use the measured profile of
:mod:`moe_scaling.ondevice.calibrate` (single-kernel micro-benchmarks: fixed costs per call and the
rate of each kernel class, never these models' timings; bench/latency_model.py validates it on six
models). Both count the fp32 KV cache and fp32 embeddings the export stores.

The machine is shared: run nothing else while it times (the timings take /tmp/moe-timing.lock).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from moe_scaling.runtime import timing_lock
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.costs import DeviceProfile, param_counts, roofline, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt")
PROMPTS = (128, 512)
DECODE_AFTER, DECODE_TOKENS = 128, 32
THREADS = (1, 2)
COMMON = dict(vocab_size=256, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, max_seq_len=640)
MODELS = {
    "dense": ModelConfig(**COMMON, d_ff=2816),
    "moe": ModelConfig(**COMMON, d_ff=2816, n_experts=16, top_k=2, d_expert=160, n_shared=1, d_shared=160,
                       router="softmax", norm_topk=False),
}
DATA = DataConfig(corpus=CORPUS, seq_len=128)
TRAIN = TrainConfig(tokens=40 * 8 * 128, batch_size=8, lr=1e-3, warmup=4, eval_every=40, eval_batches=2,
                    ckpt_every=40, log_every=10, seed=0)
PAPER = {"model": "MobileMoE-S vs dense at comparable INT4 weight memory", "decode": [2.2, 3.4],
         "prefill": [1.8, 3.8]}


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(threads: int, mb: int = 256) -> float:
    """Bytes/s of ``threads`` concurrent NumPy copies of ``mb`` MB each (read + write bytes)."""
    srcs = [np.ones(mb * 2**20 // 8) for _ in range(threads)]
    dsts = [np.empty_like(a) for a in srcs]

    def run():
        ts = [threading.Thread(target=np.copyto, args=(d, s)) for d, s in zip(dsts, srcs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    run()
    return 2 * sum(a.nbytes for a in srcs) / _best(run, 5)


def int4_gemm_ops(threads: int, m: int = 512, k: int = 2048, n: int = 2048, reps: int = 5) -> float:
    """ops/s of ONNX Runtime's MatMulNBits (INT4 weights, int8 activations) at ``threads``: with
    ``m = 512`` the matrix-matrix peak, with ``m = 1`` (and a 16 MB weight) the batch-1 kernel."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    s = np.full((n, k // 32), 0.01, np.float32)
    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m, n])],
                              initializer=[onnx.numpy_helper.from_array(b, "b"), onnx.numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m, k)).astype(np.float32)
    sess.run(None, {"a": a})
    return 2 * m * k * n / _best(lambda: sess.run(None, {"a": a}), reps)


def prepare(workdir: Path) -> dict:
    """Train each model briefly and export it (reused when ``workdir`` already holds them)."""
    from moe_scaling.ondevice.runtime import export_onnx_checkpoint
    from moe_scaling.train.loop import train

    out = {}
    for name, cfg in MODELS.items():
        run, exp = workdir / f"{name}-run", workdir / f"{name}-onnx"
        t = time.perf_counter()
        result = train(cfg, TRAIN, DATA, ckpt_dir=run, progress=False)
        train_s = time.perf_counter() - t
        if not (exp / "model.onnx").is_file():
            export_onnx_checkpoint(run, exp)
        out[name] = {"dir": exp, "eval_loss": result.final_eval_loss, "train_s": train_s,
                     "steps": TRAIN.steps(DATA.seq_len)}
    return out


def measure(lm, tokens: np.ndarray) -> dict:
    out = {s: lm.prefill_ms(tokens[:s]) for s in PROMPTS}
    out["decode"] = lm.decode_ms(tokens[:DECODE_AFTER + DECODE_TOKENS], DECODE_AFTER)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="write bench/device_latency.json")
    ap.add_argument("--dir", default=None, help="keep trained runs and exports here (reused by a rerun)")
    ap.add_argument("--rounds", type=int, default=3, help="repeat the timings (host profile included); "
                    "medians are reported (default 3)")
    args = ap.parse_args()
    from moe_scaling.ondevice.calibrate import measure_profile
    from moe_scaling.ondevice.runtime import OnnxLM
    from moe_scaling.runtime import machine_info

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="device_latency_"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = prepare(workdir)
    text = Path(CORPUS).read_bytes()[-2 * max(PROMPTS):]
    tokens = np.frombuffer(text, np.uint8).astype(np.int64)
    rounds = []                                  # the whole measurement, repeated: the machine is shared
    with timing_lock():
        for _ in range(args.rounds):
            host, measured = {}, {}
            for threads in THREADS:
                host[threads] = {"mem_bandwidth_gbs": copy_bandwidth(threads) / 1e9,
                                 "matmul_gflops": int4_gemm_ops(threads) / 1e9}
                profile, _ = measure_profile(threads)
                host[threads].update({f"measured.{k}": v for k, v in profile.to_mapping().items()
                                      if k in DeviceProfile.RATES + DeviceProfile.SECONDS})
                for name in MODELS:                                      # interleaved, same conditions
                    lm = OnnxLM(models[name]["dir"], threads=threads)
                    measured[name, threads] = measure(lm, tokens)
                    print(name, threads, {k: round(v, 2) for k, v in measured[name, threads].items()}, flush=True)
            rounds.append((host, measured))
    # every number is the median over rounds; the speedups also carry their range over rounds
    med = lambda values: float(np.median(list(values)))
    host = {t: {k: med(r[0][t][k] for r in rounds) for k in rounds[0][0][t]} for t in THREADS}
    measured = {key: {k: med(r[1][key][k] for r in rounds) for k in rounds[0][1][key]} for key in rounds[0][1]}
    results = []
    for threads in THREADS:
        h = host[threads]
        plain = DeviceProfile(name=f"this-host-{threads}t-plain", description="copy bandwidth and GEMM peak",
                              memory_bandwidth=h["mem_bandwidth_gbs"] * 1e9, peak_ops=h["matmul_gflops"] * 1e9)
        dev = DeviceProfile(name=f"this-host-{threads}t", description="measured (moe_scaling.ondevice.calibrate)",
                            threads=threads, **{k.split(".", 1)[1]: v for k, v in h.items() if k.startswith("measured.")})
        kw = dict(weights="int4", kv="fp32", embeddings="fp32")
        for name, cfg in MODELS.items():
            ms = measured[name, threads]
            ctx = DECODE_AFTER + DECODE_TOKENS // 2
            dec, dec0 = (roofline(cfg, d, context=ctx, prompt=1, **kw) for d in (dev, plain))
            for s in PROMPTS:
                pre, pre0 = (roofline(cfg, d, context=s, prompt=s, **kw) for d in (dev, plain))
                results.append({
                    "name": name, "kind": "moe" if cfg.is_moe else "dense",
                    "int4_weight_bytes": weight_bytes(cfg, "int4", embeddings="fp32"),
                    "params_total": param_counts(cfg).total, "params_active": param_counts(cfg).active,
                    "threads": threads, "prefill_tokens": s,
                    "measured_prefill_ms": ms[s], "predicted_prefill_ms": pre["prefill_ms"],
                    "prefill_bound": pre["prefill_bound"], "plain_roofline_prefill_ms": pre0["prefill_ms"],
                    "measured_decode_ms": ms["decode"], "predicted_decode_ms": dec["decode_ms_per_token"],
                    "decode_bound": dec["decode_bound"], "plain_roofline_decode_ms": dec0["decode_ms_per_token"]})

    def ratio(key, threads, s=512):
        d, m = (next(r for r in results if r["kind"] == kind and r["threads"] == threads and r["prefill_tokens"] == s)
                for kind in ("dense", "moe"))
        return d[key] / m[key]

    def spread(key, threads):
        return [min(r[1]["dense", threads][key] / r[1]["moe", threads][key] for r in rounds),
                max(r[1]["dense", threads][key] / r[1]["moe", threads][key] for r in rounds)]

    per_threads = {t: {"decode_speedup": ratio("measured_decode_ms", t),
                       "decode_speedup_range": spread("decode", t),
                       "prefill_speedup": ratio("measured_prefill_ms", t),
                       "prefill_speedup_range": spread(512, t),
                       "predicted_decode_speedup": ratio("predicted_decode_ms", t),
                       "predicted_prefill_speedup": ratio("predicted_prefill_ms", t)} for t in THREADS}
    import onnxruntime

    out = {"runtime": f"onnxruntime {onnxruntime.__version__} (CPU; MatMulNBits + QMoE, INT4 group 32, int8 "
                      "dynamic activations, fp32 KV cache)",
           "host": {"cores": os.cpu_count(), **host[max(THREADS)], "by_threads": host},
           "machine": machine_info(),
           "results": results,
           "moe_over_dense": {**per_threads[max(THREADS)], "at": f"{max(THREADS)} threads, prefill 512",
                              "by_threads": per_threads, "paper": PAPER},
           "models": {name: {**cfg.to_dict(), "eval_loss": models[name]["eval_loss"],
                             "train_steps": models[name]["steps"]} for name, cfg in MODELS.items()},
           "settings": {"prompts": PROMPTS, "decode_after": DECODE_AFTER, "decode_tokens": DECODE_TOKENS,
                        "prefill": "best of 3 after a warm-up", "decode": "median", "rounds": args.rounds,
                        "aggregate": "median over rounds; *_range: min and max over rounds"}}
    print(json.dumps(out["moe_over_dense"], indent=1))
    if args.json:
        from moe_scaling.files import write_json
        write_json(Path(__file__).with_name("device_latency.json"), out)


if __name__ == "__main__":
    main()
