"""Why 2-thread MoE is slower than the latency model predicts (issue 26): ONNX Runtime's QMoE at 1 and 2 threads.

    python bench/qmoe_threads.py --dir /tmp/lm --json   # --dir: bench/latency_model.py's exports (reused)

Three measurements (1 and 2: medians of ``--rounds`` alternating runs), each timing in a fresh
interpreter per thread count (one shared pool, as
:mod:`moe_scaling.ondevice.calibrate`), sessions cycled cold as there:

1. ``qmoe``: one QMoE node at the validated models' shapes, top-k in 1, 2, 4, on 1 token and on 128
   tokens under uniform random routing (what calibrate.py fits): the 2-thread speedup per shape.
2. ``skew``: one QMoE node on 128 tokens, top-1, with the tokens sent to the experts in set counts
   (uniform, all on one, 64/64, 104/8/8/8, 64/22/21/21): does the kernel split the work over
   experts (then the busiest thread bounds the time) or inside them?
3. ``models``: the routing of bench/latency_model.py's three MoE models (random initialisation) on
   its 128-token prefill prompt, per layer (tokens per expert, sorted), and their QMoE nodes' time
   at 1 and 2 threads from ONNX Runtime's profiler; beside it the least 2-thread time any split of
   whole experts over the threads allows: per layer ``t_1 * max_load / (T k)``, ``max_load`` the
   busiest thread's token-expert pairs under a largest-first split (a layer with one active expert
   runs it on both threads, at the speedup measured for ``all on one``).

Found (bench/README.md, "latency model"): with two or more experts active the kernel gives each
expert to one thread (one active expert is split inside), so a layer's 2-thread time is bound by its
busiest expert; a uniform routing (the calibration's) balances the threads, the validated models'
random-init routers do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPES = [(768, 1024, 4, 1), (768, 1024, 4, 2), (768, 1024, 4, 4), (1024, 1024, 8, 1),
          (1024, 160, 16, 1), (1024, 160, 16, 2), (1024, 160, 16, 4), (512, 64, 32, 4)]
SKEW = {"uniform": [32, 32, 32, 32], "all on one": [128, 0, 0, 0], "64/64": [64, 64, 0, 0],
        "104/8/8/8": [104, 8, 8, 8], "64/22/21/21": [64, 22, 21, 21]}
T = 128
MOE_MODELS = ("moe-m-coarse4", "moe-l-fine16", "moe-s-fine32")


def child_kernels(threads: int) -> dict:
    from moe_scaling.ondevice.calibrate import _cycle, _qmoe_model, _session, qmoe_call

    rng = np.random.default_rng(0)
    out: dict = {"threads": threads, "qmoe": [], "skew": []}
    for tokens in (1, T):
        for d, f, e, k in SHAPES:
            t, r = qmoe_call(d, f, e, k, tokens, threads, 96e6 if tokens == 1 else 12e6, 5 if tokens == 1 else 3, rng)
            out["qmoe"].append({"d": d, "f": f, "E": e, "k": k, "tokens": tokens, "us": 1e6 * t, "copies": r})
    d, f, e = 768, 1024, 4
    sessions = [_session(_qmoe_model(d, f, e, 1, T, rng), threads) for _ in range(6)]
    for name, counts in SKEW.items():
        feeds = []
        for _ in range(6):
            ids = np.concatenate([np.full(c, j) for j, c in enumerate(counts)])
            rng.shuffle(ids)
            r = rng.standard_normal((T, e)).astype(np.float32)
            r[np.arange(T), ids] += 20.0                     # top-1 is expert ids[t] by a wide margin
            feeds.append({"x": rng.standard_normal((T, d)).astype(np.float32), "r": r})
        out["skew"].append({"d": d, "f": f, "E": e, "k": 1, "tokens": T, "case": name, "counts": counts,
                            "us": 1e6 * _cycle(sessions, feeds, 3)})
    return out


def prompt() -> np.ndarray:
    text = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"
    return (np.frombuffer(text.read_bytes()[-1024:], np.uint8).astype(np.int64) if text.is_file()
            else np.arange(1024) % 256)[:T]                  # bench/latency_model.py's prefill prompt


def routing(path: Path) -> list[list[int]]:
    """Tokens per expert (sorted, largest first) of every QMoE layer on the prompt."""
    import onnx
    import onnxruntime as ort

    from moe_scaling.ondevice.runtime import OnnxLM

    m = onnx.load(str(path / "model.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "QMoE"]
    k = next(a.i for a in nodes[0].attribute if a.name == "k")
    for n in nodes:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n.input[1], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    probs = sess.run([n.input[1] for n in nodes], {"input_ids": prompt()[None], **OnnxLM(path).empty_cache()})
    return [sorted(np.bincount(np.argsort(-p.reshape(T, -1), axis=1)[:, :k].ravel(),
                               minlength=p.shape[-1]).tolist(), reverse=True) for p in probs]


def child_profile(path: Path, threads: int) -> dict:
    """Per-layer QMoE kernel ms of the prompt's prefill (ORT profiler, best of 3 runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_profiling, opts.profile_file_prefix = True, f"/tmp/qmoe_threads_{path.name}_{threads}"
    sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    from moe_scaling.ondevice.runtime import OnnxLM

    lm = OnnxLM(path)
    lm.session = sess
    for _ in range(4):
        lm.prefill(prompt())
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][-3:]
    per_run = []
    for run in runs:                                  # the QMoE nodes in the order they ran: layer by layer
        calls = sorted((e["ts"], e["dur"] / 1e3) for e in events
                       if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                       and e["args"].get("op_name") == "QMoE" and run["ts"] <= e["ts"] <= run["ts"] + run["dur"])
        per_run.append([ms for _, ms in calls])
    best = min(per_run, key=sum)
    return {"threads": threads, "qmoe_ms_per_layer": best, "qmoe_ms": sum(best)}


def max_load(counts: list[int], threads: int = 2) -> int:
    """The busiest thread's token-expert pairs when whole experts go to threads largest first."""
    loads = [0] * threads
    for c in sorted(counts, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)


def spawn(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="bench/latency_model.py's exports (it writes them there if absent)")
    ap.add_argument("--json", action="store_true", help="write bench/qmoe_threads.json")
    ap.add_argument("--rounds", type=int, default=3, help="kernel timings: alternate 1 and 2 threads this many times")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = child_kernels(int(rest[0])) if kind == "kernels" else child_profile(Path(rest[0]), int(rest[1]))
        print(json.dumps(out))
        return
    if not args.dir:
        ap.error("--dir is required")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency_model import export_all

    dirs = export_all(Path(args.dir))
    # the 2-thread timings move between runs on this shared 2-core machine: alternate 1 and 2 threads
    # ``rounds`` times and keep each time's median and range
    runs = [{t: spawn("--child", "kernels", str(t)) for t in (1, 2)} for _ in range(args.rounds)]

    def med(part: str, i: int, t: int) -> tuple[float, list[float]]:
        xs = [r[t][part][i]["us"] for r in runs]
        return float(np.median(xs)), [min(xs), max(xs)]

    out: dict = {"rounds": args.rounds, "qmoe": [], "skew": [], "models": {}}
    for i, a in enumerate(runs[0][1]["qmoe"]):
        (u1, r1), (u2, r2) = med("qmoe", i, 1), med("qmoe", i, 2)
        out["qmoe"].append({**{k: a[k] for k in ("d", "f", "E", "k", "tokens")}, "us_1t": u1, "us_2t": u2,
                            "speedup_2t": u1 / u2, "range_us_1t": r1, "range_us_2t": r2})
    for i, a in enumerate(runs[0][1]["skew"]):
        (u1, r1), (u2, r2) = med("skew", i, 1), med("skew", i, 2)
        out["skew"].append({"case": a["case"], "counts": a["counts"], "us_1t": u1, "us_2t": u2, "speedup_2t": u1 / u2,
                            "range_us_1t": r1, "range_us_2t": r2, "expert_split_bound": T / max_load(a["counts"])})
    one_expert = next(s["speedup_2t"] for s in out["skew"] if s["case"] == "all on one")
    for name in MOE_MODELS:
        counts = routing(dirs[name])
        prof = {t: spawn("--child", "profile", str(dirs[name]), str(t)) for t in (1, 2)}
        t1 = prof[1]["qmoe_ms_per_layer"]
        implied = [t * (max_load(c) / sum(c) if sum(1 for x in c if x) > 1 else 1 / one_expert) for t, c in zip(t1, counts)]
        out["models"][name] = {"tokens_per_expert": counts, "qmoe_ms_1t": prof[1]["qmoe_ms"], "qmoe_ms_2t": prof[2]["qmoe_ms"],
                               "speedup_2t": prof[1]["qmoe_ms"] / prof[2]["qmoe_ms"],
                               "qmoe_ms_2t_best_expert_split": sum(implied)}
        print(name, {k: v for k, v in out["models"][name].items() if k != "tokens_per_expert"}, flush=True)
    for q in out["qmoe"]:
        print(q)
    for s in out["skew"]:
        print(s)
    if args.json:
        import onnxruntime

        from moe_scaling.files import write_json
        from moe_scaling.runtime import machine_info

        out["machine"], out["runtime"] = machine_info(), f"onnxruntime {onnxruntime.__version__}"
        write_json(Path(__file__).with_name("qmoe_threads.json"), out)


if __name__ == "__main__":
    main()
