"""The budget options of ``moe-fit`` (and ``moe-build --fit``): the on-device sweet-spot search.

``moe-fit`` wires them in with two calls::

    add_budget_arguments(parser)               # --budget-mem, --budget-flops, --tokens, --emit, ...
    result.update(run_budget(args, fit))       # {} unless --budget-mem was given

``run_budget`` returns :meth:`optimize.SearchResult.to_dict` (``sweet_spot``, ``dense``,
``frontier``, ``frontier_flops``, ``binding``, ``published``, ``law``, ...) and, with ``--emit DIR``,
``emitted``: the builder's summary of DIR. :func:`format_budget` renders it for people.
"""

from __future__ import annotations

import argparse
from typing import Any

from moe_scaling.errors import ConfigError
from moe_scaling.units import format_count, parse_bytes, parse_count, parse_flops, parse_latency_ms
from moe_scaling.design.search import ArchSpace, Budget, LossModel, search

__all__ = ["add_budget_arguments", "budget_from_args", "run_budget", "format_budget"]

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
    g.add_argument("--compute-rule", default="6N", choices=("6N", "3x-forward"),
                   help="how --train-compute becomes tokens (default 6N)")
    g.add_argument("--weights", default="int4", help="weight precision on device (default int4 = 4.5 bits)")
    g.add_argument("--kv", default="int8", help="KV-cache precision (default int8)")
    g.add_argument("--context", type=int, default=4096, help="context length in tokens (default 4096)")
    g.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default 128256, as MobileMoE)")
    g.add_argument("--search-method", default="auto", choices=("auto", "exhaustive", "tpe"),
                   help="exhaustive for small spaces, optuna TPE for large (default auto)")
    g.add_argument("--search-seed", type=int, default=0, help="seed of the TPE search (default 0)")
    g.add_argument("--interval-level", type=float, default=0.9,
                   help="coverage of the bootstrap interval on predicted loss (default 0.9)")
    if emit:
        g.add_argument("--emit", default=None, metavar="DIR",
                       help="write the sweet spot's model directory (config.json, recipe.yaml, ...) to DIR")


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    """The :class:`Budget` the options describe; None without ``--budget-mem``."""
    if args.budget_mem is None:
        for opt in ("budget_flops", "budget_latency", "emit"):
            if getattr(args, opt, None) is not None:
                raise ConfigError(f"--{opt.replace('_', '-')}: needs --budget-mem; add e.g. --budget-mem 2GB")
        return None
    if args.budget_latency is not None and args.device is None:
        raise ConfigError("--budget-latency: needs --device NAME (moe-cost --list-devices)")
    return Budget(
        memory=parse_bytes(args.budget_mem, field="--budget-mem"), weights=args.weights, kv=args.kv,
        context=args.context, device=args.device,
        flops_per_token=parse_flops(args.budget_flops) if args.budget_flops else None,
        latency_ms=parse_latency_ms(args.budget_latency) if args.budget_latency else None,
        tokens=(parse_count(args.tokens, field="--tokens") if args.tokens else
                None if args.train_compute else 1e12),
        train_compute=parse_count(args.train_compute, field="--train-compute") if args.train_compute else None,
        compute_rule=args.compute_rule)


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
    with ``--emit DIR`` also build the sweet spot's model directory."""
    budget = budget_from_args(args)
    if budget is None:
        return {}
    if not 0 < args.interval_level < 1:
        raise ConfigError(f"--interval-level = {args.interval_level}: must be in (0, 1); e.g. 0.9")
    result = search(fit, budget, ArchSpace(vocab_size=args.vocab), method=args.search_method,
                    seed=args.search_seed, level=args.interval_level).to_dict()
    if getattr(args, "emit", None):
        if result["sweet_spot"] is None:
            raise nothing_fits(args)
        from moe_scaling.design.builder import build, config_from_sweet_spot

        spot = result["sweet_spot"]
        result["emitted"] = build(
            config_from_sweet_spot(spot), args.emit, weights=budget.weights, kv=budget.kv,
            context=budget.context, device=budget.device, tokens=spot["tokens"],
            source=f"the sweet spot of a {args.budget_mem} budget ({getattr(fit, 'law', 'fitted')} law)",
            prediction=spot)
        result["emitted"].pop("costs")
    return result


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
    if result["dense"]:
        lines.append("best dense: " + _describe(result["dense"]))
        lines.append(f"MoE advantage (dense loss - sweet spot loss): {result['moe_advantage']:+.4f}")
    law = result["law_scope"]
    if law["fixed_knobs"]:
        lines.append("law cannot see: " + ", ".join(law["not_distinguished"])
                     + f"; fixed: {law['fixed_knobs']}")
    lines.append(f"frontier: {len(result['frontier'])} points (loss vs memory), "
                 f"{len(result['frontier_flops'])} (loss vs FLOPs); --json for all")
    if "emitted" in result:
        lines.append(f"wrote {result['emitted']['out']}/ ({', '.join(result['emitted']['files'])})")
    return "\n".join(lines)
