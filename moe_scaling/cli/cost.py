"""``moe-cost``: parameters, FLOPs, bytes and roofline latency of one model config."""

from __future__ import annotations

from typing import Any, Sequence

from moe_scaling.hf.config import read_model_config
from moe_scaling.errors import ConfigError
from moe_scaling.costs import cost_summary, list_devices, published_models
from moe_scaling.units import format_bytes, format_count, format_flops
from moe_scaling.cli._common import make_parser, print_json, run_cli

EXAMPLES = """\
  moe-cost mobilemoe-l
  moe-cost mobilemoe-l --weights int4 --kv int8 --context 4096 --device snapdragon-8-gen-3
  moe-cost my_model.yaml
  moe-cost path/to/hf/config.json --weights bf16 --json
  moe-cost --list-devices
  moe-cost --profile-host --threads 2          # measure this CPU's ONNX Runtime kernels (~1 min)
  moe-cost mobilemoe-l --device this-host      # then cost on the measured profile
"""


def format_table(s: dict[str, Any]) -> str:
    """A readable two-column table of a :func:`cost_summary`."""
    rows = [
        ("params total", f"{format_count(s['params_total'])}  ({s['params_total']:,})"),
        ("params active / token", f"{format_count(s['params_active'])}  ({s['params_active']:,})"),
        ("params embedding", f"{format_count(s['params_embedding'])}  ({s['params_embedding']:,})"),
        ("experts (routed, top-k)", f"{s['n_experts']}, top-{s['top_k']}"),
        ("granularity / expansion", f"{s['granularity']:g} / {s['expansion']:g}"),
        ("sparsity / activation ratio", f"{s['sparsity']:.3f} / {s['activation_ratio']:.3f}"),
        (f"FLOPs/token forward @ {s['context']}", format_flops(s["flops_per_token_forward"])),
        (f"FLOPs/token training @ {s['context']}", format_flops(s["flops_per_token_training"])),
        (f"weights ({s['weights']})", format_bytes(s["weight_bytes"])),
        (f"KV cache ({s['kv']}, {s['context']} tokens)", format_bytes(s["kv_cache_bytes"])),
        ("total on device", format_bytes(s["total_bytes"])),
    ]
    if "device" in s:
        rows += [
            (f"decode on {s['device']}", f"{s['decode_ms_per_token']:.2f} ms/token ({s['decode_bound']}-bound)"),
            (f"prefill {s['prompt_tokens']} tokens", f"{s['prefill_ms']:.1f} ms ({s['prefill_bound']}-bound)"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _body(argv: Sequence[str] | None) -> int:
    parser = make_parser("moe-cost", "Parameters, FLOPs per token, bytes on device and roofline "
                         "latency of a model config (our YAML/JSON or a Hugging Face config.json).",
                         EXAMPLES)
    parser.add_argument("config", nargs="?", help="ModelConfig YAML/JSON, an HF config.json, or a "
                        "published model name (mobilemoe-l, olmoe-1b-7b, mixtral-8x7b, qwen1.5-moe-a2.7b)")
    parser.add_argument("--weights", default="int4", help="weight precision (bf16, int8, int4, int4-g64, ...); default int4")
    parser.add_argument("--embeddings", default=None, help="embedding precision (default: as --weights)")
    parser.add_argument("--kv", default="int8", help="KV-cache precision; default int8")
    parser.add_argument("--context", type=int, default=4096, help="context length in tokens; default 4096")
    parser.add_argument("--prompt", type=int, default=None, help="prefill prompt length (default: --context)")
    parser.add_argument("--device", default=None, help="device profile name or YAML file for latency")
    parser.add_argument("--list-devices", action="store_true", help="list the shipped device profiles")
    parser.add_argument("--profile-host", action="store_true", help="measure this host's device profile from "
                        "single-kernel micro-benchmarks of ONNX Runtime and cache it as --device this-host")
    parser.add_argument("--threads", type=int, default=None, help="--profile-host: intra-op threads "
                        "(default: all cores)")
    parser.add_argument("--profile-bytes", default="96MB", help="--profile-host: weights per micro-benchmark, "
                        "beyond the last-level cache (default 96MB)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.profile_host:
        return _profile_host(args)
    if args.list_devices:
        devices = list_devices()
        if args.json:
            print_json({n: vars(d) for n, d in devices.items()})
        else:
            for n, d in devices.items():
                print(f"{n:<20} {d.memory_bandwidth / 1e9:6.1f} GB/s  {d.peak_ops / 1e12:5.1f} TOPS  {d.description}")
        return 0
    if args.config is None:
        raise ConfigError("config: missing; give a ModelConfig YAML/JSON or an HF config.json")
    if args.context < 1:
        raise ConfigError(f"--context = {args.context}: must be >= 1; e.g. --context 4096")
    if args.prompt is not None and args.prompt < 1:
        raise ConfigError(f"--prompt = {args.prompt}: must be >= 1; e.g. --prompt 512")
    published = {n: m for n, m in published_models().items() if m.config is not None}
    cfg = published[args.config].config if args.config in published else read_model_config(args.config)
    summary = cost_summary(cfg, weights=args.weights, kv=args.kv, context=args.context,
                           device=args.device, embeddings=args.embeddings, prompt=args.prompt)
    print_json(summary) if args.json else print(format_table(summary))
    return 0


def _profile_host(args) -> int:
    import os

    from moe_scaling.costs import save_host_profile
    from moe_scaling.ondevice.calibrate import measure_profile
    from moe_scaling.units import parse_bytes

    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    if threads < 1:
        raise ConfigError(f"--threads = {threads}: must be >= 1; e.g. --threads 2")
    cold = parse_bytes(args.profile_bytes)
    profile, _ = measure_profile(threads, cold_bytes=float(cold))
    paths = save_host_profile(profile)
    if args.json:
        print_json({**profile.to_mapping(), "cached": [str(p) for p in paths]})
    else:
        for key, value in profile.to_mapping().items():
            print(f"{key:<20} {value}")
        print(f"cached as {', '.join(str(p) for p in paths)} (use --device this-host)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("moe-cost", _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
