"""``moe-export``: a trained run as a Hugging Face model directory (config.json + model.safetensors), or
with ``--runtime onnx`` as an ONNX Runtime folder with INT4 weights (model.onnx + runtime.json)."""

from __future__ import annotations

from typing import Sequence

from moe_scaling.cli._common import make_parser, print_json, run_cli
from moe_scaling.hf.export import DTYPES, export_checkpoint

EXAMPLES = """\
  moe-export runs/demo --out hf/demo
  moe-export sweeps/quickstart/runs/3f2a9c1e0b7d --out hf/best --dtype bfloat16
  moe-export runs/demo --out hf/demo-step200 --step 200 --json
  moe-export runs/demo --out ondevice/demo --runtime onnx          (needs the ondevice extra)
then: AutoModelForCausalLM.from_pretrained("hf/demo")   (transformers >= 5)
  or: moe_scaling.ondevice.runtime.OnnxLM("ondevice/demo", threads=2).generate(prompt_ids, 32)
"""


def _body(argv: Sequence[str] | None) -> int:
    parser = make_parser("moe-export", "Export the model of a training run (the ckpt_dir of train(), or "
                         "a sweep's runs/<id> folder) as a Hugging Face directory: config.json, "
                         "model.safetensors and a README.md model card. transformers loads it with "
                         "AutoModelForCausalLM and computes the same logits.", EXAMPLES)
    parser.add_argument("run", metavar="RUN_DIR", help="checkpoint folder of a train() run, or a sweep run folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--runtime", default="hf", choices=("hf", "onnx"),
                        help="hf: transformers directory (default); onnx: ONNX Runtime file with INT4 weights "
                             "(group 32) for on-device CPUs")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="stored precision of --runtime hf "
                        "(default float32)")
    parser.add_argument("--activations", default="int8", choices=("int8", "fp32"),
                        help="--runtime onnx: int8 dynamic activations (the on-device scheme, default) or "
                             "fp32 products")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.runtime == "onnx":
        from moe_scaling.ondevice.runtime import export_onnx_checkpoint

        summary = export_onnx_checkpoint(args.run, args.out, activations=args.activations, step=args.step)
        detail = (f"ONNX Runtime: step {summary['step']} ({summary['status']}), {summary['bytes'] / 1e6:.1f} MB "
                  f"({summary['int4_weight_bytes'] / 1e6:.1f} MB INT4 weights; the cost model counts "
                  f"{summary['cost_model_bytes'] / 1e6:.1f} MB as ONNX Runtime stores it), {summary['activations']} activations")
    else:
        summary = export_checkpoint(args.run, args.out, dtype=args.dtype, step=args.step)
        detail = (f"{summary['model_type']}: step {summary['step']} ({summary['status']}), "
                  f"{summary['parameters']:,} parameters, {summary['dtype']}, {summary['bytes'] / 1e6:.1f} MB")
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {summary['out']}/ ({', '.join(summary['files'])})")
    print(f"  {detail}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("moe-export", _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
