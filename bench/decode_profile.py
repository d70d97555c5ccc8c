"""Where one decoded token's time goes, MoE against dense of equal INT4 memory, and what two changes buy.

    python bench/decode_profile.py --dir /tmp/lm --json   # the exports of bench/latency_model.py --dir /tmp/lm

For ``dense-l`` and ``moe-l-fine16`` of bench/latency_model.py (100.4 vs 102.6 MB INT4), at 1 and 2
threads: decode ms/token (median of 32 tokens after a 128-token prompt, median of 3 repeats, each model
in a fresh process, the models interleaved, 3 rounds), ONNX Runtime's profiler's kernel time per op
type for one token (the profiler adds ~10%), and the two variants:

* ``ORT_QMOE_CPU_QNBIT_GEMM=int8``: the only switch ORT's CPU QMoE kernel reads (its experts on the
  MatMulNBits GEMM path);
* one GroupQueryAttention decode step (16 heads, 4 KV heads, 64 wide) with its cache fed in and a new,
  longer cache returned (what :class:`~moe_scaling.ondevice.runtime.OnnxLM` does) against one
  preallocated buffer bound as both past and present (IO binding; the kernel then appends in place),
  16 caches cycled through one session, at 144 and 512 cached positions, outputs compared.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PAIR = ("dense-l", "moe-l-fine16")
VARIANTS = {"baseline": {}, "ORT_QMOE_CPU_QNBIT_GEMM=int8": {"ORT_QMOE_CPU_QNBIT_GEMM": "int8"}}


def decode_child(path: str, threads: int, profile: str | None) -> dict:
    from moe_scaling.ondevice.runtime import OnnxLM

    lm = OnnxLM(path, threads=threads)
    toks = np.arange(160) % 256
    out = {"decode_ms": float(np.median([lm.decode_ms(toks, 128) for _ in range(3)]))}
    if profile:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_profiling, opts.profile_file_prefix = True, profile
        sess = ort.InferenceSession(str(Path(path) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        _, c = lm.prefill(toks[:128])
        lm.session = sess
        for t in toks[128:160]:
            _, c = lm.decode(int(t), c)
        events = json.loads(Path(sess.end_profiling()).read_text())
        n = sum(1 for e in events if e.get("name") == "model_run")
        per_op, calls = collections.defaultdict(float), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"] / n / 1e3
                calls[e["args"]["op_name"]] += 1
        out["profile_kernel_ms_per_token"] = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
        out["profile_calls_per_token"] = {k: v // n for k, v in calls.items()}
        out["profiled_run_ms_per_token"] = sum(e["dur"] for e in events if e.get("name") == "model_run") / n / 1e3
    return out


def gqa_share_buffer(threads: int, pasts=(144, 512), copies: int = 16, max_len: int = 640) -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    h, kv, hd = 16, 4, 64
    f32 = onnx.TensorProto.FLOAT
    ang = np.arange(max_len)[:, None] * (1.0 / 10000 ** (np.arange(0, hd, 2) / hd))[None, :]
    inputs = [helper.make_tensor_value_info(n, f32, [1, 1, w]) for n, w in (("q", h * hd), ("k", kv * hd), ("v", kv * hd))]
    inputs += [helper.make_tensor_value_info(n, f32, [1, kv, "P", hd]) for n in ("pk", "pv")]
    inputs += [helper.make_tensor_value_info("seqlens", onnx.TensorProto.INT32, [1]),
               helper.make_tensor_value_info("total", onnx.TensorProto.INT32, [])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total", "cos", "sin"],
                            ["o", "ko", "vo"], domain="com.microsoft", num_heads=h, kv_num_heads=kv, do_rotary=1,
                            rotary_interleaved=0)
    graph = helper.make_graph([node], "gqa", inputs, [helper.make_tensor_value_info(n, f32, None) for n in ("o", "ko", "vo")],
                              initializer=[numpy_helper.from_array(np.cos(ang).astype(np.float32), "cos"),
                                           numpy_helper.from_array(np.sin(ang).astype(np.float32), "sin")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    one = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sessions = [one] * copies          # one session (one thread pool), ``copies`` caches and bindings
    rng = np.random.default_rng(0)
    q = {n: rng.standard_normal((1, 1, w)).astype(np.float32) for n, w in (("q", h * hd), ("k", kv * hd), ("v", kv * hd))}
    out = {}
    for past in pasts:
        lens = {"seqlens": np.array([past], np.int32), "total": np.array(past + 1, np.int32)}
        caches = [(rng.standard_normal((1, kv, past, hd)).astype(np.float32),
                   rng.standard_normal((1, kv, past, hd)).astype(np.float32)) for _ in sessions]
        feeds = [dict(q, pk=k, pv=v, **lens) for k, v in caches]
        bindings = []
        for s, (k, v) in zip(sessions, caches, strict=True):
            kb, vb = (np.zeros((1, kv, max_len, hd), np.float32) for _ in range(2))
            kb[:, :, :past], vb[:, :, :past] = k, v
            kv_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (kb, vb)]
            b = s.io_binding()
            for n, a in {**q, **lens}.items():
                b.bind_cpu_input(n, a)
            b.bind_ortvalue_input("pk", kv_values[0])
            b.bind_ortvalue_input("pv", kv_values[1])
            b.bind_output("o")
            b.bind_ortvalue_output("ko", kv_values[0])
            b.bind_ortvalue_output("vo", kv_values[1])
            bindings.append((s, b, kv_values))
        copy_o = sessions[0].run(["o"], feeds[0])[0]
        s0, b0, _ = bindings[0]
        s0.run_with_iobinding(b0)
        shared_o = b0.copy_outputs_to_cpu()[0]

        def cycle(run):
            for i in range(copies):
                run(i)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                for i in range(copies):
                    run(i)
                times.append((time.perf_counter() - t) / copies)
            return 1e6 * float(np.median(times))

        out[str(past)] = {"copy_us": cycle(lambda i, f=feeds: sessions[i].run(None, f[i])),
                          "shared_buffer_us": cycle(lambda i, bs=bindings: bs[i][0].run_with_iobinding(bs[i][1])),
                          "max_abs_output_difference": float(np.abs(copy_o - shared_o).max())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="bench/latency_model.py --dir (holds dense-l and moe-l-fine16)")
    ap.add_argument("--json", action="store_true", help="write bench/decode_profile.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gqa-only", action="store_true", help="re-measure only the attention part into the JSON")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "THREADS", "PROFILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, threads, profile = args.child
        print(json.dumps(decode_child(path, int(threads), None if profile == "-" else profile)))
        return
    from moe_scaling.files import write_json
    from moe_scaling.runtime import machine_info

    if args.gqa_only:
        path = Path(__file__).with_name("decode_profile.json")
        out = json.loads(path.read_text())
        out["gqa_shared_kv_buffer"] = {str(t): gqa_share_buffer(t) for t in (1, 2)}
        out["gqa_machine"] = machine_info()
        print(json.dumps(out["gqa_shared_kv_buffer"], indent=1))
        write_json(path, out)
        return

    runs = collections.defaultdict(list)
    for r in range(args.rounds):
        for threads in (1, 2):
            for variant, env in VARIANTS.items():
                for name in PAIR:
                    profile = f"/tmp/decode_profile_{name}_{threads}" if r == 0 and variant == "baseline" else "-"
                    done = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--child",
                                           str(Path(args.dir) / name), str(threads), profile],
                                          capture_output=True, text=True, env={**os.environ, **env}, check=True)
                    runs[threads, variant, name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(r, threads, variant, name, round(runs[threads, variant, name][-1]["decode_ms"], 2), flush=True)
    rows = []
    for (threads, variant, name), ds in runs.items():
        row = {"threads": threads, "variant": variant, "model": name,
               "decode_ms": float(np.median([d["decode_ms"] for d in ds])), "decode_ms_rounds": [d["decode_ms"] for d in ds]}
        for d in ds:
            row.update({k: v for k, v in d.items() if k.startswith("profile")})
        rows.append(row)
    speedup = {f"{t} threads, {v}": next(x["decode_ms"] for x in rows if x["threads"] == t and x["variant"] == v and x["model"] == PAIR[0])
               / next(x["decode_ms"] for x in rows if x["threads"] == t and x["variant"] == v and x["model"] == PAIR[1])
               for t in (1, 2) for v in VARIANTS}
    out = {"machine": machine_info(), "decode": rows, "moe_over_dense_decode": speedup,
           "gqa_shared_kv_buffer": {str(t): gqa_share_buffer(t) for t in (1, 2)},
           "settings": {"decode": "median of 32 tokens after 128, median of 3 repeats per process, median over rounds",
                        "rounds": args.rounds}}
    print(json.dumps({"moe_over_dense_decode": speedup, "gqa_shared_kv_buffer": out["gqa_shared_kv_buffer"]}, indent=1))
    if args.json:
        write_json(Path(__file__).with_name("decode_profile.json"), out)


if __name__ == "__main__":
    main()
