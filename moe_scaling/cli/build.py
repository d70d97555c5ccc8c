"""``moe-build``: a model directory (HF config.json, model.yaml, recipe.yaml, costs.json, README.md).

One source per call: ``--sweet-spot`` (read as a :class:`Candidate`), ``--fit`` plus a budget
(:func:`design.builder.build_from_fit`), ``--active/--total`` (:func:`design.builder.config_from_spec`)
or ``--config``. Options the chosen source would ignore are refused (exit 2), not dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from moe_scaling.cli._common import make_parser, print_json, run_cli
from moe_scaling.cli.budget import (SEARCH_ONLY, add_budget_arguments, budget_from_args, given_options,
                                    nothing_fits, option)
from moe_scaling.design.builder import build, build_from_fit, config_from_spec
from moe_scaling.design.candidate import Candidate
from moe_scaling.design.search import NothingFits
from moe_scaling.design.space import ArchSpace
from moe_scaling.errors import InputError
from moe_scaling.hf.config import read_model_config
from moe_scaling.units import parse_count

EXAMPLES = """\
  moe-build --active 922M --total 5.3B --granularity 8 --shared 1 --out configs/mobilemoe-l
  moe-build --active 20M --total 40M --granularity 2 --tokenizer bpe:2048 --out build/tiny   # then: moe-train build/tiny ...
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


def _parser():
    parser = make_parser("moe-build", "Write a model directory from a sweet spot, a fit plus a budget, "
                         "a parameter-count spec or a ModelConfig: Hugging Face config.json, model.yaml, "
                         "recipe.yaml (four stages), costs.json and a README.md model card.", EXAMPLES)
    src = parser.add_argument_group("source (exactly one)")
    src.add_argument("--sweet-spot", metavar="JSON", help="moe-fit --budget-mem ... --json output (or its sweet_spot)")
    src.add_argument("--fit", metavar="JSON", help="a saved fit; searches the budget given by --budget-mem ...")
    src.add_argument("--active", help="active parameters per token, e.g. 922M or 0.9B (with --total)")
    src.add_argument("--total", help="total parameters, e.g. 5.3B (with --active)")
    src.add_argument("--config", metavar="YAML", help="a ModelConfig YAML/JSON or an HF config.json")
    parser.add_argument("--granularity", type=int, default=None, help="with --active/--total: G (default 8)")
    parser.add_argument("--shared", type=int, default=None, choices=(0, 1),
                        help="with --active/--total: one shared expert of width d_ff/2 (default 1)")
    parser.add_argument("--tokenizer", default=None, metavar="SPEC",
                        help="byte, bpe:N or a tokenizer.json path: sets the vocabulary (as --vocab would) and is "
                             "written to recipe.yaml, so moe-train uses it without --tokenizer")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--name", default=None, help="model name for the card (default: DIR's name)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_budget_arguments(parser, emit=False)
    return parser


def _source(args) -> str:
    """The one source given; refuses options that source would ignore."""
    given = [n for n in ("sweet_spot", "fit", "active", "config") if getattr(args, n)]
    if args.total and "active" not in given:
        given.append("active")
    if len(given) != 1:
        raise InputError("give exactly one source: --sweet-spot, --fit, --active/--total or --config")
    source = given[0]
    if args.budget_mem and source != "fit":
        raise InputError("--budget-mem: only with --fit (the budget is searched with the fit's law)")
    if source not in ("fit", "active") and args.vocab is not None:
        raise InputError(f"--vocab {args.vocab}: only acts with --fit or --active/--total (the {source.replace('_', '-')} "
                         "source has its own vocabulary); drop it")
    if source != "fit":
        for flag in given_options(args, tuple(n for n in SEARCH_ONLY if n != "vocab")):
            raise InputError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: only acts with --fit "
                             "(it sets the budget search); drop it or build from --fit")
    if source != "active":
        for flag in given_options(args, ("granularity", "shared")):
            raise InputError(f"{flag} {getattr(args, flag[2:])}: only acts with --active/--total; drop it")
    return source


def _vocab(args) -> int | None:
    """The vocabulary asked for: ``--vocab``, or the one ``--tokenizer`` implies (they must agree)."""
    if args.tokenizer is None:
        return args.vocab
    from moe_scaling.train.tokenizers import tokenizer_vocab_size
    n = tokenizer_vocab_size(args.tokenizer, field="--tokenizer")
    if args.vocab is not None and args.vocab != n:
        raise InputError(f"--vocab {args.vocab}: --tokenizer {args.tokenizer} has {n} ids; drop --vocab "
                         f"or give --vocab {n}")
    return n


def _from_fit(args) -> dict:
    from moe_scaling.laws.fit import load_fit
    from moe_scaling.laws.published import layout_law

    if args.budget_mem is None:
        raise InputError("--fit: needs a budget; add --budget-mem, e.g. --budget-mem 2GB")
    budget = budget_from_args(args)
    fit = layout_law(load_fit(args.fit))  # a bad fit file is a FitError: a UserError, exit 2
    try:
        result, summary = build_from_fit(
            fit, budget, args.out, space=ArchSpace(vocab_size=_vocab(args) or option(args, "vocab")),
            method=option(args, "search_method"), seed=option(args, "search_seed"),
            level=option(args, "interval_level"), name=args.name, tokenizer=args.tokenizer,
            source=f"the sweet spot of a {args.budget_mem} budget under {Path(args.fit).name}")
    except NothingFits:
        raise nothing_fits(args) from None
    return {**summary, "binding": result.binding, "dense": result.dense.to_dict() if result.dense else None}


def _body(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    source = _source(args)
    tokens = parse_count(args.tokens, field="--tokens") if args.tokens else 1e12
    prediction, note = None, {}
    if source == "fit":
        summary = _from_fit(args)
    else:
        if source == "sweet_spot":
            spot = Candidate.from_dict(_read_json(args.sweet_spot, "--sweet-spot"))
            cfg, prediction = spot.config, spot.to_dict()
            tokens = tokens if args.tokens else spot.tokens
            origin = f"the sweet spot in {Path(args.sweet_spot).name}"
        elif source == "active":
            cfg, origin, note = _from_spec(args)
        else:
            cfg = read_model_config(args.config)
            origin = Path(args.config).name
        summary = build(cfg, args.out, name=args.name, weights=option(args, "weights"),
                        kv=option(args, "kv"), context=option(args, "context"), device=args.device,
                        tokens=tokens, source=origin, prediction=prediction, tokenizer=args.tokenizer)
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


def _from_spec(args):
    if not (args.active and args.total):
        raise InputError("--active and --total: give both, e.g. --active 922M --total 5.3B")
    G = 8 if args.granularity is None else args.granularity
    shared = 1 if args.shared is None else args.shared
    if G < 1:
        raise InputError(f"--granularity {G}: must be a whole number >= 1; e.g. 8")
    vocab = _vocab(args)
    space = ArchSpace(n_layers_max=96, **({"vocab_size": vocab} if vocab else {}))
    match = config_from_spec(args.active, args.total, granularity=G, shared=shared, space=space)
    origin = (f"the spec --active {args.active} --total {args.total} --granularity {G} --shared {shared}"
              + (f" --vocab {vocab}" if vocab else ""))
    return match.config, origin, {"spec_within_tolerance": match.within_tolerance,
                                  "spec_candidates_within_tolerance": match.candidates_within_tolerance}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("moe-build", _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
