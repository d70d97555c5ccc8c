"""The budget options of ``moe-fit`` (and ``moe-build --fit``): the on-device sweet-spot search.

``moe-fit`` wires them in with two calls::

    add_budget_arguments(parser)               # --budget-mem, --budget-flops, --tokens, --emit, ...
    result.update(run_budget(args, fit))       # {} unless --budget-mem was given

``run_budget`` returns :meth:`moe_scaling.design.search.SearchResult.to_dict` (``sweet_spot``,
``dense``, ``frontier``, ``frontier_flops``, ``binding``, ``published``, ``law_scope``, ...) and, with
``--emit DIR``, ``emitted``: the builder's summary of DIR (:func:`design.builder.build_from_fit`).
:func:`format_budget` renders it for people.

Every option defaults to None so that one given without ``--budget-mem`` (where the search does
not run and the option would be ignored) is refused; :data:`DEFAULTS` holds the values used when
an option is not given (:func:`option`).
"""

from __future__ import annotations

import argparse
from typing import Any

from moe_scaling.errors import ConfigError
from moe_scaling.units import format_count, parse_bytes, parse_count, parse_flops, parse_latency_ms
from moe_scaling.design.candidate import LossModel
from moe_scaling.design.search import NothingFits, search
from moe_scaling.design.space import ArchSpace, Budget
from moe_scaling.laws.fit import Fit
from moe_scaling.laws.published import layout_law

__all__ = ["DEFAULTS", "SEARCH_ONLY", "add_budget_arguments", "option", "given_options", "budget_from_args",
           "run_budget", "format_budget", "nothing_fits"]

DEFAULTS = {"compute_rule": "6N", "weights": "int4", "kv": "int8", "context": 4096, "vocab": 128256,
            "search_method": "auto", "search_seed": 0, "interval_level": 0.9}
"""The value of each budget option that is not given."""

SEARCH_ONLY = ("budget_mem", "budget_flops", "budget_latency", "train_compute", "compute_rule", "vocab",
               "search_method", "search_seed", "interval_level")
"""Options only the search reads (``moe-build`` refuses them without ``--fit``)."""

_ALL = ("budget_flops", "budget_latency", "device", "tokens", "train_compute", "compute_rule", "weights",
        "kv", "context", "vocab", "search_method", "search_seed", "interval_level", "emit")


def option(args: argparse.Namespace, name: str) -> Any:
    """``args.<name>``, or its :data:`DEFAULTS` value when the option was not given."""
    value = getattr(args, name, None)
    return DEFAULTS.get(name) if value is None else value


def given_options(args: argparse.Namespace, names) -> list[str]:
    """The flags (``--budget-flops``, ...) among ``names`` the user gave."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]

def add_budget_arguments(parser: argparse.ArgumentParser, *, emit: bool = True) -> None:
    """Add the budget options (one argument group) to ``parser``."""
    g = parser.add_argument_group("on-device budget (sweet-spot search)")
    g.add_argument("--budget-mem", default=None, metavar="BYTES",
                   help="memory on device for weights + KV cache, e.g. 2GB, 1.5GiB, 800MB")
    g.add_argument("--budget-flops", default=None, metavar="FLOPS",
                   help="forward FLOPs per token at --context, e.g. 2G or 2e9")
    g.add_argument("--budget-latency", default=None, metavar="TIME",
                   help="roofline decode time per token on --device, e.g. 30ms")
    g.add_argument("--device", default=None, help="device profile for latency (moe-cost --list-devices)")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--tokens", default=None, help="training tokens, e.g. 1e12 (default 1e12)")
    t.add_argument("--train-compute", default=None, metavar="FLOPS",
                   help="training compute; tokens = C / (6 N_active_non_embedding) per architecture")
    g.add_argument("--compute-rule", default=None, choices=("6N", "3x-forward"),
                   help="how --train-compute becomes tokens (default 6N)")
    g.add_argument("--weights", default=None, help="weight precision on device (default int4 = 4.5 bits)")
    g.add_argument("--kv", default=None, help="KV-cache precision (default int8)")
    g.add_argument("--context", type=int, default=None, help="context length in tokens (default 4096)")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 128256, as MobileMoE)")
    g.add_argument("--search-method", default=None, choices=("auto", "exhaustive", "tpe"),
                   help="exhaustive for small spaces, optuna TPE for large (default auto)")
    g.add_argument("--search-seed", type=int, default=None, help="seed of the TPE search (default 0)")
    g.add_argument("--interval-level", type=float, default=None,
                   help="coverage of the bootstrap interval on predicted loss (default 0.9)")
    if emit:
        g.add_argument("--emit", default=None, metavar="DIR",
                       help="write the sweet spot's model directory (config.json, recipe.yaml, ...) to DIR")


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    """The :class:`Budget` the options describe; None without ``--budget-mem``, where any other
    budget option given is refused (it would be ignored)."""
    if args.budget_mem is None:
        for flag in given_options(args, _ALL):
            raise ConfigError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: only acts with a budget "
                              "search and needs --budget-mem; add e.g. --budget-mem 2GB or drop it")
        return None
    if args.budget_latency is not None and args.device is None:
        raise ConfigError("--budget-latency: needs --device NAME (moe-cost --list-devices)")
    return Budget(
        memory=parse_bytes(args.budget_mem, field="--budget-mem"), weights=option(args, "weights"),
        kv=option(args, "kv"), context=option(args, "context"), device=args.device,
        flops_per_token=parse_flops(args.budget_flops) if args.budget_flops else None,
        latency_ms=parse_latency_ms(args.budget_latency) if args.budget_latency else None,
        tokens=(parse_count(args.tokens, field="--tokens") if args.tokens else
                None if args.train_compute else 1e12),
        train_compute=parse_count(args.train_compute, field="--train-compute") if args.train_compute else None,
        compute_rule=option(args, "compute_rule"))


def nothing_fits(args: argparse.Namespace) -> ConfigError:
    """The one-line error for a search with no feasible architecture, naming every budget given."""
    given = [f"{flag} {value}" for flag, value in (("--budget-mem", args.budget_mem),
                                                   ("--budget-flops", getattr(args, "budget_flops", None)),
                                                   ("--budget-latency", getattr(args, "budget_latency", None)))
             if value]
    return ConfigError(f"{' and '.join(given)}: nothing in the space meets "
                       f"{'this budget' if len(given) == 1 else 'these budgets together'}; raise "
                       f"{'it' if len(given) == 1 else 'one of them'}")


def run_budget(args: argparse.Namespace, fit: LossModel) -> dict[str, Any]:
    """Run the sweet-spot search the options ask for with ``fit``'s law ({} without --budget-mem);
    with ``--emit DIR`` also build the sweet spot's model directory (one library call,
    :func:`design.builder.build_from_fit`)."""
    budget = budget_from_args(args)
    if budget is None:
        return {}
    if isinstance(fit, Fit):
        fit = layout_law(fit)
    level = option(args, "interval_level")
    if not 0 < level < 1:
        raise ConfigError(f"--interval-level = {level}: must be in (0, 1); e.g. 0.9")
    kw = dict(space=ArchSpace(vocab_size=option(args, "vocab")), method=option(args, "search_method"),
              seed=option(args, "search_seed"), level=level)
    if not getattr(args, "emit", None):
        return search(fit, budget, **kw).to_dict()
    from moe_scaling.design.builder import build_from_fit

    try:
        searched, emitted = build_from_fit(
            fit, budget, args.emit, **kw,
            source=f"the sweet spot of a {args.budget_mem} budget ({getattr(fit, 'law', 'fitted')} law)")
    except NothingFits:
        raise nothing_fits(args) from None
    emitted.pop("costs")
    return {**searched.to_dict(), "emitted": emitted}


def _describe(p: dict[str, Any]) -> str:
    arch = (f"d_model {p['d_model']} x {p['n_layers']} layers, {p['n_experts']} experts of width "
            f"{p['d_expert']} top-{p['top_k']}" + (f" + {p['n_shared']} shared of width {p['d_shared']}"
                                                    if p["n_shared"] else "")
            if p["n_experts"] > 1 else f"dense, d_model {p['d_model']} x {p['n_layers']} layers, d_ff {p['d_ff']}")
    iv = p.get("predicted_loss_interval")
    loss = f"{p['predicted_loss']:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else " (no interval)")
    return (f"{arch}\n    {format_count(p['params_active'])} active / {format_count(p['params_total'])} total, "
            f"{p['total_bytes'] / 1e9:.3f} GB, {p['flops_per_token_forward'] / 1e9:.2f} GFLOPs/token, "
            f"{p['tokens']:.3g} tokens, predicted loss {loss}")


def law_scope_lines(law: dict[str, Any]) -> list[str]:
    """The law's scope as lines: the knobs it cannot see, the layouts it predicts alike and what
    they were fixed to; then the source (and the scale it was fitted at) of each of its terms."""
    lines = []
    if law["fixed_knobs"]:
        alike = "; ".join(f"{k} in {tuple(v)}" for k, v in law.get("indistinct_layouts", {}).items())
        fixed = ", ".join(f"{k}={v}" for k, v in law["fixed_knobs"].items())
        lines.append(f"law cannot see {', '.join(law['fixed_knobs'])}: predicts {alike} alike; fixed to {fixed}")
    for t in law.get("terms", []):
        if t.get("law") or t.get("source"):
            lines.append(f"law term {t['term']}: {t['source']}" + (f" ({t['scale']})" if t.get("scale") else ""))
    return lines


def format_budget(result: dict[str, Any]) -> str:
    """A few readable lines of a :func:`run_budget` result ("" when it holds no search, so a
    ``moe-fit`` result dict can be passed whole)."""
    if "sweet_spot" not in result:
        return ""
    b = result["budget"]
    lines = [f"budget: {b['memory'] / 1e9:g} GB ({b['weights']} weights, {b['kv']} KV at {b['context']} tokens)"
             + (f", {b['flops_per_token'] / 1e9:g} GFLOPs/token" if b["flops_per_token"] else "")
             + (f", {b['latency_ms']:g} ms/token on {b['device']}" if b["latency_ms"] else "")]
    if result["sweet_spot"] is None:
        return "\n".join(lines + ["sweet spot: nothing in the space fits this budget"])
    lines.append("sweet spot: " + _describe(result["sweet_spot"]))
    lines.append(f"binding: {', '.join(result['binding'])}")
    if result.get("space_bounds"):
        lines.append(f"on the search space's bounds: {', '.join(result['space_bounds'])} (there the space, "
                     "not a budget or the law, stops the optimum)")
    if result["dense"]:
        lines.append("best dense: " + _describe(result["dense"]))
        lines.append(f"MoE advantage (dense loss - sweet spot loss): {result['moe_advantage']:+.4f}")
    lines += law_scope_lines(result["law_scope"])
    lines.append(f"frontier: {len(result['frontier'])} points (loss vs memory), "
                 f"{len(result['frontier_flops'])} (loss vs FLOPs); --json for all")
    if "emitted" in result:
        lines.append(f"wrote {result['emitted']['out']}/ ({', '.join(result['emitted']['files'])})")
    return "\n".join(lines)
