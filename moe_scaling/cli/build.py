"""``moe-build``: a model directory (HF config.json, model.yaml, recipe.yaml, costs.json, README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from moe_scaling.design.builder import build, config_from_spec, config_from_sweet_spot
from moe_scaling.cli._common import make_parser, print_json, run_cli
from moe_scaling.errors import InputError
from moe_scaling.cli.budget import add_budget_arguments, budget_from_args, nothing_fits
from moe_scaling.hf.config import read_model_config
from moe_scaling.errors import ConfigError
from moe_scaling.units import parse_count

EXAMPLES = """\
  moe-build --active 922M --total 5.3B --granularity 8 --shared 1 --out configs/mobilemoe-l
  moe-build --sweet-spot sweet_2gb.json --out configs/phone-2gb --device snapdragon-8-gen-3
  moe-build --fit fits/joint_moe_published.json --budget-mem 2GB --train-compute 1e21 --out configs/phone-2gb
  moe-build --config my_model.yaml --out configs/mine --weights int4 --kv int8 --context 4096
"""


def _read_json(path: str, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {path}: no such file; check the path")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{what} {path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _body(argv: Sequence[str] | None) -> int:
    parser = make_parser("moe-build", "Write a model directory from a sweet spot, a fit plus a budget, "
                         "a parameter-count spec or a ModelConfig: Hugging Face config.json, model.yaml, "
                         "recipe.yaml (four stages), costs.json and a README.md model card.", EXAMPLES)
    src = parser.add_argument_group("source (exactly one)")
    src.add_argument("--sweet-spot", metavar="JSON", help="moe-fit --budget-mem ... --json output (or its sweet_spot)")
    src.add_argument("--fit", metavar="JSON", help="a saved fit; searches the budget given by --budget-mem ...")
    src.add_argument("--active", help="active parameters per token, e.g. 922M or 0.9B (with --total)")
    src.add_argument("--total", help="total parameters, e.g. 5.3B (with --active)")
    src.add_argument("--config", metavar="YAML", help="a ModelConfig YAML/JSON or an HF config.json")
    parser.add_argument("--granularity", type=int, default=8, help="with --active/--total: G (default 8)")
    parser.add_argument("--shared", type=int, default=1, choices=(0, 1),
                        help="with --active/--total: one shared expert of width d_ff/2 (default 1)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--name", default=None, help="model name for the card (default: DIR's name)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_budget_arguments(parser, emit=False)
    args = parser.parse_args(argv)

    given = [n for n in ("sweet_spot", "fit", "active", "config") if getattr(args, n)]
    if args.total and "active" not in given:
        given.append("active")
    if len(given) != 1:
        raise InputError("give exactly one source: --sweet-spot, --fit, --active/--total or --config")
    source = given[0]
    if args.budget_mem and source != "fit":
        raise InputError("--budget-mem: only with --fit (the budget is searched with the fit's law)")
    tokens = parse_count(args.tokens, field="--tokens") if args.tokens else 1e12
    prediction, note = None, {}
    if source == "sweet_spot":
        doc = _read_json(args.sweet_spot, "--sweet-spot")
        cfg = config_from_sweet_spot(doc)
        prediction = doc.get("sweet_spot", doc)
        tokens = float(prediction.get("tokens", tokens)) if not args.tokens else tokens
        origin = f"the sweet spot in {Path(args.sweet_spot).name}"
    elif source == "fit":
        from moe_scaling.laws.errors import FitError
        from moe_scaling.laws.fit import load_fit
        from moe_scaling.design.search import ArchSpace, search

        budget = budget_from_args(args)
        if budget is None:
            raise InputError("--fit: needs a budget; add --budget-mem, e.g. --budget-mem 2GB")
        try:
            fit = load_fit(args.fit)
        except FitError as err:
            raise InputError(str(err)) from None
        result = search(fit, budget, ArchSpace(vocab_size=args.vocab), method=args.search_method,
                        seed=args.search_seed, level=args.interval_level)
        if result.sweet_spot is None:
            raise nothing_fits(args)
        prediction = result.sweet_spot
        cfg = config_from_sweet_spot(prediction)
        tokens = prediction["tokens"]
        origin = f"the sweet spot of a {args.budget_mem} budget under {Path(args.fit).name}"
        note = {"binding": result.binding, "dense": result.dense}
    elif source == "active":
        if not (args.active and args.total):
            raise InputError("--active and --total: give both, e.g. --active 922M --total 5.3B")
        if args.granularity < 1:
            raise InputError(f"--granularity {args.granularity}: must be a whole number >= 1; e.g. 8")
        match = config_from_spec(args.active, args.total, granularity=args.granularity, shared=args.shared)
        cfg = match.config
        origin = (f"the spec --active {args.active} --total {args.total} --granularity "
                  f"{args.granularity} --shared {args.shared}")
        note = {"spec_within_tolerance": match.within_tolerance,
                "spec_candidates_within_tolerance": match.candidates_within_tolerance}
    else:
        cfg = read_model_config(args.config)
        origin = Path(args.config).name
    summary = build(cfg, args.out, name=args.name, weights=args.weights, kv=args.kv,
                    context=args.context, device=args.device, tokens=tokens, source=origin,
                    prediction=prediction)
    summary.update(note)
    if args.json:
        print_json(summary)
        return 0
    c = summary["costs"]
    print(f"wrote {summary['out']}/ ({', '.join(summary['files'])})")
    print(f"  {summary['model_type']}: {c['params_total']:,} total / {c['params_active']:,} active parameters, "
          f"{c['total_bytes'] / 1e9:.3f} GB on device ({c['weights']} + {c['kv']} KV at {c['context']})")
    if note.get("spec_within_tolerance") is False:
        print("  note: no family member rounds to both counts; this is the closest")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("moe-build", _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
