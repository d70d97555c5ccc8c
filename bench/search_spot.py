"""The search on this host's measured profile, checked by running what it returns.

    python bench/search_spot.py --json      # writes bench/search_spot.json (~4 min on 2 cores)

Measures this host's profile (``moe-cost --profile-host`` at ``--threads``, cached in a temporary
``$MOE_SCALING_CACHE``), searches the published joint law under a 200 MB / 8 ms-per-token budget on
``--device this-host`` (fp32 KV cache at 512 tokens, byte vocabulary, 1e10 training tokens), exports the
sweet spot and the best dense model from their random initialisation (latency does not depend on the
weights' values) and decodes 32 tokens after a 512-token prompt with ONNX Runtime at the same thread
count: measured against the search's predicted decode time (target: within 1.5x). Timings take
/tmp/moe-timing.lock (`moe_scaling.runtime.timing_lock`); run nothing else while it times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONTEXT, DECODE_TOKENS = 512, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="write bench/search_spot.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="search_spot_"))
    os.environ["MOE_SCALING_CACHE"] = str(work / "cache")

    from flax import nnx

    from moe_scaling.costs import load_device, roofline, save_host_profile
    from moe_scaling.design.search import search
    from moe_scaling.design.space import ArchSpace, Budget
    from moe_scaling.laws.fit import load_fit
    from moe_scaling.model.transformer import Transformer
    from moe_scaling.ondevice.calibrate import measure_profile
    from moe_scaling.ondevice.runtime import OnnxLM, export_onnx
    from moe_scaling.runtime import machine_info

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_scaling.runtime import timing_lock

    machine = machine_info()
    with timing_lock():
        profile, _ = measure_profile(args.threads)
    save_host_profile(profile)
    dev = load_device("this-host")
    budget = Budget(memory=200 * 10**6, tokens=1e10, context=CONTEXT, kv="fp32", device="this-host", latency_ms=8.0)
    result = search(load_fit(ROOT / "fits" / "joint_moe_published.json"), budget, ArchSpace(vocab_size=256))
    rows = []
    tokens = np.arange(CONTEXT + DECODE_TOKENS) % 256
    for kind, cand in (("sweet spot", result.sweet_spot), ("best dense", result.dense)):
        cfg = cand.config
        export_onnx(cfg, Transformer(cfg, rngs=nnx.Rngs(0)), work / kind.replace(" ", "_"),
                    max_positions=CONTEXT + DECODE_TOKENS)
        lm = OnnxLM(work / kind.replace(" ", "_"), threads=args.threads)
        with timing_lock():
            measured = float(np.median([lm.decode_ms(tokens, CONTEXT) for _ in range(3)]))
        # as exported: fp32 embeddings, the median token after CONTEXT + DECODE_TOKENS / 2 positions
        as_run = roofline(cfg, dev, weights="int4", kv="fp32", embeddings="fp32",
                          context=CONTEXT + DECODE_TOKENS // 2)["decode_ms_per_token"]
        rows.append({"kind": kind, "config": cfg.to_dict(), "params_total": cand.costs["params_total"],
                     "params_active": cand.costs["params_active"], "total_bytes": cand.costs["total_bytes"],
                     "search_predicted_decode_ms": cand.costs["decode_ms_per_token"],
                     "predicted_decode_ms_as_run": as_run, "measured_decode_ms": measured,
                     "measured_over_predicted": measured / as_run, "measured_decode_ms_repeats": reps})
        print(kind, cfg.d_model, cfg.n_layers, cfg.n_experts, cfg.top_k, cfg.d_expert, round(measured, 2),
              round(as_run, 2), flush=True)
    out = {"machine": machine, "threads": args.threads, "budget": budget.to_dict(), "profile": profile.to_mapping(),
           "binding": result.binding, "rows": rows,
           "settings": {"decode": f"median of {DECODE_TOKENS} tokens after a {CONTEXT}-token prompt, median of 3",
                        "weights": "random initialisation (seed 0)"}}
    if args.json:
        from moe_scaling.files import write_json
        write_json(Path(__file__).with_name("search_spot.json"), out)


if __name__ == "__main__":
    main()
