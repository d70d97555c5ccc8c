"""``moe-fit``: fit a scaling law to runs, with bootstrap intervals and held-out error.

INPUT is a sweep directory (its ``runs.parquet``: completed runs, loss = eval_loss), a CSV or parquet
runs table with canonical columns (``--column canonical=theirs`` maps other names), or a saved fit
JSON (nothing is fitted; use it with ``--predict``). See :mod:`moe_scaling.laws.fit` for the procedure.
With ``--budget-mem`` and no INPUT the project's default fit (:data:`DEFAULT_FIT`) is used and the
output says so.

``--budget-mem`` alone (no ``--tokens``, ``--train-compute`` or ``--budget-latency``) asks the
memory-only question, whose answer depends on how long the model trains: the output (``--json`` key
``by_compute``) is the sweet spot at each training-compute budget of
:data:`~moe_scaling.design.search.BY_COMPUTE_DEFAULT` and where dense takes over
(:func:`moe_scaling.design.search.search_by_compute`). Any of those three options gives one answer.
``--validate DIR`` (with ``--budget-mem`` and ``--train-compute`` at a study's scale) trains the
search's optimum, runners-up and named alternatives and writes ``DIR/validation.json``
(:mod:`moe_scaling.design.validate`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moe_scaling.cli._common import make_parser, print_json, run_cli
from moe_scaling.errors import InputError
from moe_scaling.cli.budget import add_budget_arguments, format_budget, run_budget
from moe_scaling.units import format_count
from moe_scaling.cli.budget import budget_from_args, law_scope_lines, option
from moe_scaling.cli.plot import add_fit_plot_argument, fit_plot
from moe_scaling.design.search import search_by_compute
from moe_scaling.design.space import ArchSpace
from moe_scaling.design.validate import model_shape
from moe_scaling.laws.effects import MAX_GAP_WIDTH
from moe_scaling.laws.fit import Fit, fit_law, load_fit, select_law
from moe_scaling.laws.published import layout_law
from moe_scaling.laws.registry import CANONICAL_COLUMNS, LAWS, get_law
from moe_scaling.laws.tables import load_runs
from moe_scaling.runtime import default_cache_dir, enable_compilation_cache

PROG = "moe-fit"
PREDICTION_LEVEL = 0.9
BOOTSTRAP, KFOLD, SEED = 200, 5, 0      # fitting defaults (the flags default to None: "not given")
DEFAULT_FIT = Path(__file__).resolve().parents[2] / "fits" / "joint_moe_published.json"
"""The fit ``moe-fit --budget-mem ...`` uses without INPUT: the published Joint-MoE law of
Ludziejewski et al. 2025 (no bootstrap, so no intervals)."""

EXAMPLES = """\
  moe-fit results/my-sweep                                  # --law auto: every law, lowest held-out error wins
  moe-fit results/my-sweep --law joint_moe --bootstrap 500 --out fits/my-sweep.json
  moe-fit runs.csv --law chinchilla --fix alpha=0.34 --fix beta=0.28 --json
  moe-fit ../shared/data/chinchilla/svg_extracted_data.csv --law chinchilla \\
      --column params_active="Model Size" --column train_compute="Training FLOP" --drop-highest-loss 5
  moe-fit fits/joint_moe_published.json --predict candidates.csv --json
  moe-fit --budget-mem 2GB                                  # default fit; sweet spot per training compute
  moe-fit results/my-sweep --budget-mem 2GB --train-compute 1e21   # one sweet spot
  moe-fit results/my-sweep --budget-mem 2MB --train-compute 5e12 --context 128 --validate val/ --seeds 3

laws: """ + ", ".join(LAWS) + """ (auto fits every law the table has the columns for)
canonical columns: """ + ", ".join(CANONICAL_COLUMNS) + """, train_compute
  (tokens = train_compute / (6 params_active) when a table has training compute but no tokens)
intervals: coefficients at 95% (bootstrap percentiles), predictions at 90%.
Compiled fitting kernels are cached in $MOE_SCALING_JAX_CACHE (default ~/.cache/moe-scaling/jax;
set it to an empty string to disable).
"""


def _pairs(values: Sequence[str] | None, option: str) -> list[tuple[str, str]]:
    out = []
    for text in values or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"{option} {text!r}: write NAME=VALUE, e.g. {option} "
                             + ("alpha=0.34" if option == "--fix" else "params_active=n_params"))
        out.append((key.strip(), value.strip()))
    return out


def _fixes(values: Sequence[str] | None) -> dict[str, float]:
    out = {}
    for key, value in _pairs(values, "--fix"):
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"--fix {key}={value}: not a number") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-fit`` parser."""
    p = make_parser(PROG, "Fit a scaling law to training runs: robust multi-start fit, bootstrap "
                          "intervals, held-out error, law selection.", EXAMPLES)
    p.add_argument("input", metavar="INPUT", nargs="?", default=None,
                   help="sweep directory, runs table (.csv/.parquet) or saved fit (.json); may be left out "
                        "with --budget-mem (then the default fit, fits/joint_moe_published.json)")
    p.add_argument("--law", default=None, metavar="NAME|auto",
                   help=f"law to fit: {', '.join(LAWS)} or auto (default auto)")
    p.add_argument("--huber-delta", type=float, default=None, metavar="X",
                   help="Huber threshold on log-loss residuals (default 1e-3)")
    p.add_argument("--fix", action="append", metavar="NAME=VALUE", help="hold a parameter fixed (repeatable)")
    p.add_argument("--column", action="append", metavar="CANONICAL=THEIRS",
                   help="use the table's column THEIRS as CANONICAL (repeatable)")
    p.add_argument("--drop-highest-loss", type=int, default=None, metavar="K",
                   help="drop the K highest-loss runs first (the Chinchilla replication drops 5)")
    p.add_argument("--min-steps", type=int, default=None, metavar="S",
                   help="drop runs of fewer than S optimizer steps first (too short for their schedule)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help=f"bootstrap refits for intervals (default {BOOTSTRAP}; 0: none)")
    p.add_argument("--bootstrap-starts", type=int, default=None, metavar="S",
                   help="cold starts of each bootstrap refit, besides the full-data optimum (default 16); "
                        "laws with many coefficients (ondevice: 14) may need more")
    p.add_argument("--kfold", type=int, default=None, metavar="K",
                   help=f"folds for kfold_rmse (default {KFOLD}; 0: none)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of the bootstrap draws and folds (default {SEED})")
    p.add_argument("--predict", metavar="FILE", help="table of inputs (CSV/parquet): predicted loss per row")
    p.add_argument("--out", metavar="FIT.json", help="write the fit as JSON (e.g. fits/my-sweep.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_budget_arguments(p)
    v = p.add_argument_group("closed loop (train what the search predicts)")
    v.add_argument("--validate", metavar="DIR", default=None,
                   help="with --budget-mem and --train-compute (at the study's scale, e.g. --budget-mem 2MB "
                        "--train-compute 5e12 --context 128): train the optimum, two runners-up and named "
                        "alternatives in the study space and write DIR/validation.json")
    v.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds per candidate with --validate (default 3)")
    v.add_argument("--plan", action="store_true",
                   help="with --validate: write DIR/grid.yaml and show the candidates, their steps and where the "
                        "budget binds the optimum; train nothing (choose budgets before spending compute)")
    v.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local worker processes training the candidates with --validate (default 1)")
    v.add_argument("--like", metavar="GRID", default=None,
                   help="with --validate: train the candidates as the study GRID trained its runs (its data, "
                        "batch, schedule, router, its learning rate by size) in a space around its sizes")
    add_fit_plot_argument(p)
    return p


def _fitting_only(args: argparse.Namespace) -> list[str]:
    """The fitting options given on the command line (a flag left at its default is None)."""
    options = (("--law", args.law), ("--fix", args.fix), ("--huber-delta", args.huber_delta),
               ("--drop-highest-loss", args.drop_highest_loss), ("--min-steps", args.min_steps),
               ("--bootstrap", args.bootstrap), ("--bootstrap-starts", args.bootstrap_starts),
               ("--kfold", args.kfold), ("--seed", args.seed))
    return [o for o, v in options if v is not None]


def _fitted(args: argparse.Namespace, columns: dict[str, str]) -> Fit:
    """The fit INPUT asks for: loaded from a fit JSON (refusing the fitting options), or fitted to
    the runs (flags not given take the defaults ``BOOTSTRAP``, ``KFOLD``, ``SEED``)."""
    if str(args.input).lower().endswith(".json"):
        given = _fitting_only(args)
        if given:
            raise InputError(f"{', '.join(given)}: INPUT {args.input} is a saved fit; these options apply "
                             "only when fitting runs (drop them, or give a runs table or sweep folder)")
        return load_fit(args.input)
    bootstrap = BOOTSTRAP if args.bootstrap is None else args.bootstrap
    kfold = KFOLD if args.kfold is None else args.kfold
    seed = SEED if args.seed is None else args.seed
    if bootstrap < 0 or kfold < 0 or (args.drop_highest_loss or 0) < 0 or (args.min_steps or 0) < 0:
        raise InputError("--bootstrap, --kfold, --drop-highest-loss and --min-steps must be >= 0")
    if args.bootstrap_starts is not None and args.bootstrap_starts < 1:
        raise InputError(f"--bootstrap-starts {args.bootstrap_starts}: must be at least 1")
    table, notes = load_runs(args.input, columns)
    kw: dict[str, Any] = dict(huber_delta=1e-3 if args.huber_delta is None else args.huber_delta,
                              fix=_fixes(args.fix), bootstrap=bootstrap, seed=seed, kfold=kfold,
                              drop_highest_loss=args.drop_highest_loss or 0, min_steps=args.min_steps or 0,
                              bootstrap_starts=args.bootstrap_starts or 16)
    enable_compilation_cache(default_cache_dir())
    law = args.law or "auto"
    if law == "auto":
        fit, _ = select_law(table, **kw)
    else:
        fit = fit_law(get_law(law), table, **kw)
    return dataclasses.replace(fit, notes=tuple(notes) + fit.notes,
                               settings={**fit.settings, "input": str(args.input), "columns": columns})


def _default_input(args: argparse.Namespace) -> str | None:
    """Fill in INPUT when it was left out: the default fit with ``--budget-mem`` (returns the note
    saying so), else a one-line error."""
    if args.input is not None:
        return None
    if args.budget_mem is None:
        raise InputError("INPUT: give a sweep directory, runs table or fit JSON (it may be left out only "
                         "with --budget-mem, which then uses the default fit)")
    if not DEFAULT_FIT.is_file():
        raise InputError(f"no INPUT and the default fit {DEFAULT_FIT} is not there; give a fit JSON or runs")
    args.input = str(DEFAULT_FIT)
    return (f"no INPUT: used the project's default fit {DEFAULT_FIT.parent.name}/{DEFAULT_FIT.name} "
            "(published Joint-MoE coefficients, Ludziejewski et al. 2025; no interval)")


def by_compute_wanted(args: argparse.Namespace) -> bool:
    """Whether the options ask the memory-only question: ``--budget-mem`` without ``--tokens``,
    ``--train-compute`` or ``--budget-latency``."""
    return (args.budget_mem is not None and args.tokens is None and args.train_compute is None
            and args.budget_latency is None)


def run_by_compute(args: argparse.Namespace, fit: Fit) -> dict[str, Any]:
    """``{"by_compute": ...}``: :func:`search_by_compute` under the budget options given."""
    if getattr(args, "emit", None):
        raise InputError("--emit: --budget-mem alone answers per training compute, not with one model; add "
                         "--train-compute C, --tokens D or --budget-latency T to emit its sweet spot")
    level = option(args, "interval_level")
    if not 0 < level < 1:
        raise InputError(f"--interval-level = {level}: must be in (0, 1); e.g. 0.9")
    budget = budget_from_args(args)
    result = search_by_compute(layout_law(fit), budget, space=ArchSpace(vocab_size=option(args, "vocab")),
                               level=level)
    return {"by_compute": result.to_dict()}


def run_validation(args: argparse.Namespace, fit: Fit) -> dict[str, Any]:
    """``{"validation": ...}``: :func:`moe_scaling.design.validate.validate` under the budget given
    (it needs --budget-mem and --train-compute), in the study space (byte vocabulary unless --vocab)."""
    from moe_scaling.design.validate import STUDY_SPACE, study_settings, validate

    if args.budget_mem is None or args.train_compute is None:
        raise InputError(f"--validate {args.validate}: needs --budget-mem M and --train-compute C at the study's "
                         "scale, e.g. --budget-mem 2MB --train-compute 5e12 --context 128")
    if getattr(args, "emit", None):
        raise InputError("--emit: not with --validate (the closed loop trains study-scale models)")
    level = option(args, "interval_level")
    like = study_settings(args.like) if args.like else None
    if like is not None:
        space = like.space(args.vocab)
    else:
        space = STUDY_SPACE if args.vocab is None else dataclasses.replace(STUDY_SPACE, vocab_size=args.vocab)
    seeds = 3 if args.seeds is None else args.seeds
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise InputError(f"--workers {workers}: must be at least 1")
    return {"validation": validate(fit, budget_from_args(args), args.validate, seeds=seeds, space=space,
                                   level=level, workers=workers, like=like, plan=args.plan)}


def format_by_compute(bc: dict[str, Any]) -> str:
    """The ``by_compute`` table for people: one line per training-compute budget."""
    b = bc["budget"]
    lines = [f"sweet spot by training compute, {b['memory'] / 1e9:g} GB ({b['weights']} weights, {b['kv']} KV at "
             f"{b['context']} tokens); tokens = C / {'6 N_active' if b['compute_rule'] == '6N' else '(3 x forward FLOPs)'}",
             f"  {'compute':>8}  {'best':<5} {'E':>6} {'G':>3} {'shared':>6} {'active / total':>17} {'tokens':>9}  "
             f"{'loss':<24} {'dense':>7} {'MoE gain':>9}"]
    for r in bc["rows"]:
        a, iv = r["architecture"], r["predicted_loss_interval"]
        loss = f"{r['predicted_loss']:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")
        gain = "" if r["moe_advantage"] is None else f"{r['moe_advantage']:+.4f}"
        lines.append(f"  {r['train_compute']:>8.0e}  {r['winner']:<5} {a['expansion']:>6.3g} {a['granularity']:>3g} "
                     f"{a['n_shared']:>6d} {format_count(a['params_active']):>7} / {format_count(a['params_total']):<7} "
                     f"{r['tokens']:>9.3g}  {loss:<24} {r['dense_loss']:>7.4f} {gain:>9}")
    over, cross = bc["dense_takes_over"], bc["crossover"]
    last = bc["rows"][-1]["train_compute"] if bc["rows"] else None
    lines.append((f"dense takes over from {over:.0e} FLOPs of training compute" if over is not None else
                  f"dense never takes over up to {last:.0e} FLOPs: MoE is the sweet spot at every compute listed")
                 + (f" (best MoE and best dense predictions cross at {cross:.3g} FLOPs)" if cross else "")
                 + "; add --train-compute C (or --tokens, --budget-latency) for one sweet spot with its frontier")
    lines += law_scope_lines(bc["law_scope"])
    return "\n".join(lines)


def _predictions(fit: Fit, path: str, columns: dict[str, str]) -> dict[str, Any]:
    """``predictions`` (row order; null where an input is missing) and their intervals."""
    table, _ = load_runs(path, columns, strict=False)
    X = {c: np.asarray(table[c], np.float64) for c in {*fit.law_obj.inputs, "expansion", "n_shared"} if c in table}
    pred = fit.predict(X)                      # expansion and n_shared also pick each row's noise family
    out: dict[str, Any] = {"predictions": [None if not np.isfinite(v) else float(v) for v in pred]}
    if fit.has_samples:
        lo, hi = fit.predict_interval(X, level=PREDICTION_LEVEL)
        out["prediction_intervals"] = [None if not (np.isfinite(a) and np.isfinite(b)) else [float(a), float(b)]
                                       for a, b in zip(lo, hi)]
        out["prediction_interval_level"] = PREDICTION_LEVEL
    else:
        out["prediction_intervals"] = None
        out["prediction_interval_note"] = "the fit has no bootstrap samples (published coefficients): no interval"
    return out


def summary(fit: Fit) -> dict[str, Any]:
    """The ``--json`` object of a fit (without predictions)."""
    m = fit.metrics
    return {"law": fit.law, "source": fit.source, "formula": fit.law_obj.formula, "params": fit.params,
            "intervals": {k: list(v) for k, v in fit.intervals.items()}, "interval_level": fit.interval_level,
            "fixed": fit.fixed, "heldout_rmse": m.get("heldout_rmse"), "kfold_rmse": m.get("kfold_rmse"),
            "rmse": m.get("rmse"), "n_points": fit.n_points, "metrics": m, "notes": list(fit.notes),
            "data_hash": fit.data_hash, "settings": fit.settings}


def _effect_lines(effects: dict[str, Any] | None) -> list[str]:
    """The law's layout gaps (moe_scaling.laws.effects), one line per expansion."""
    if not effects:
        return []
    at, floor = effects["at"], effects.get("noise_floor")

    def gap(name: str, g: dict[str, Any]) -> str:
        iv = g.get("interval")
        text = f"{name} {g['gap']:+.4f}"
        if iv:
            text += f" [{iv[0]:+.4f}, {iv[1]:+.4f}]"
            if floor:
                text += f" ({g['width'] / floor:.2f} noise floors wide)"
        return text

    lines = [f"layout effects at the middle size ({format_count(at['params_active'])} active, "
             f"{at['tokens']:.3g} tokens), {effects['level']:.0%} intervals:"]
    for e in effects["by_expansion"]:
        parts = []
        if "granularity" in e:
            parts.append(gap(f"L(G=1) - L(G={e['best_granularity']:g})", e["granularity"]))
        if "shared" in e:
            parts.append(gap("L(no shared) - L(shared)", e["shared"]))
        lines.append(f"  E {e['expansion']:g}: " + "; ".join(parts))
    if "identified" in effects:
        lines.append("  layout identified (no layout coefficient's interval at a bound, every gap interval under "
                     f"{MAX_GAP_WIDTH:g} noise floors)" if effects["identified"] else
                     "  layout not identified: " + "; ".join(effects["unmet"]))
    return lines


def format_fit(result: dict[str, Any]) -> str:
    """Readable lines of a :func:`summary` (plus predictions when present)."""
    lines = [f"law {result['law']} ({result['source']}): {result['formula']}"]
    if result["n_points"]:
        s = result["settings"]
        lines.append(f"{result['n_points']} runs, Huber delta {s.get('huber_delta'):g}, "
                     f"{s.get('bootstrap', 0)} bootstrap refits, {s.get('n_starts')} starts")
    level = result["interval_level"]
    lines.append(f"  {'param':<10}{'value':>14}" + (f"   {level:.0%} interval" if level else ""))
    cut = set(result["metrics"].get("intervals_at_bounds") or ())
    for name, value in result["params"].items():
        iv = result["intervals"].get(name)
        tag = "  (fixed)" if name in result["fixed"] else "  (interval ends at a bound)" if name in cut else ""
        lines.append(f"  {name:<10}{value:>14.6g}" + (f"   [{iv[0]:.6g}, {iv[1]:.6g}]" if iv else "") + tag)
    m = result["metrics"]
    if "rmse" in m:
        parts = [f"rmse {m['rmse']:.4f}"]
        if m.get("heldout_rmse") is not None:
            parts.append(f"held-out rmse {m['heldout_rmse']:.4f} ({m['heldout_n']} runs: {m['heldout_rule']})")
        if m.get("kfold_rmse") is not None:
            parts.append(f"{m['kfold']}-fold rmse {m['kfold_rmse']:.4f}")
        if m.get("noise_floor"):
            regimes = ", ".join([f"{b['steps'][0]}-{b['steps'][1] or ''} steps {b['noise_floor']:.4f} ({b['dof']} dof)"
                                 for b in m.get("noise_floor_by_steps") or []]
                                + [f"{b['family']} {b['noise_floor']:.4f} ({b['dof']} dof)"
                                   for b in m.get("noise_floor_by_family") or []])
            parts.append(f"seed noise floor {m['noise_floor']:.4f} (pooled, {m['noise_floor_dof']} dof"
                         + (f"; {regimes}" if regimes else "") + ")")
            parts.append(f"rmse {m['rmse'] / m['noise_floor']:.2g}x the floor"
                         + (f", held-out {m['heldout_rmse'] / m['noise_floor']:.2g}x" if m.get("heldout_rmse") is not None
                            else ""))
        lines.append("; ".join(parts))
    lines += _effect_lines(m.get("layout_effects"))
    for row in m.get("candidates", []):
        lines.append(f"  candidate {row['law']:<11}" + (f"skipped: {row['skipped']}" if "skipped" in row else
                     "held-out rmse " + (f"{row['heldout_rmse']:.4f}" if row["heldout_rmse"] is not None else "n/a")
                     + (f", k-fold {row['kfold_rmse']:.4f}" if row["kfold_rmse"] is not None else "")
                     + f", rmse {row['rmse']:.4f}, {row['n_free']} free"))
    lines += [f"note: {n}" for n in result["notes"]]
    if "predictions" in result:
        ivs = result.get("prediction_intervals") or [None] * len(result["predictions"])
        lines.append(f"predictions ({len(result['predictions'])} rows"
                     + (f", {result['prediction_interval_level']:.0%} intervals):" if result.get("prediction_intervals")
                        else f"; {result['prediction_interval_note']}):"))
        for i, (v, iv) in enumerate(zip(result["predictions"], ivs)):
            lines.append(f"  {i:>4}  " + ("n/a" if v is None else f"{v:.4f}") + (f"  [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else ""))
    if "out" in result:
        lines.append(f"wrote {result['out']}")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    columns = dict(_pairs(args.column, "--column"))
    default_note = _default_input(args)
    fit = _fitted(args, columns)
    result = summary(fit)
    if default_note:
        result["notes"] = [default_note] + result["notes"]
        result["default_fit"] = args.input
    if args.predict:
        result.update(_predictions(fit, args.predict, columns))
    if args.seeds is not None and not args.validate:
        raise InputError(f"--seeds {args.seeds}: only acts with --validate DIR; add it or drop --seeds")
    if args.workers is not None and not args.validate:
        raise InputError(f"--workers {args.workers}: only acts with --validate DIR; add it or drop --workers")
    if args.like is not None and not args.validate:
        raise InputError(f"--like {args.like}: only acts with --validate DIR; add it or drop --like")
    if args.plan and not args.validate:
        raise InputError("--plan: only acts with --validate DIR; add it or drop --plan")
    if args.validate:
        result.update(run_validation(args, fit))
    elif by_compute_wanted(args):
        result.update(run_by_compute(args, fit))
    else:
        result.update(run_budget(args, fit))  # sweet spot and frontiers when --budget-mem is given
    if args.out:
        fit.save(args.out)
        result["out"] = str(args.out)
    if args.plot:
        result["plots"] = fit_plot(fit, args.plot, runs=args.input, columns=columns,
                                   results=[result] if "sweet_spot" in result else [],
                                   by_compute=result.get("by_compute"))
    if args.json:
        print_json(result)
    else:
        print(format_fit(result))
        budget_text = format_budget(result)
        if budget_text:
            print(budget_text)
        if "by_compute" in result:
            print(format_by_compute(result["by_compute"]))
        if "validation" in result:
            v = result["validation"]
            for c in v["candidates"]:
                iv = c["interval"]
                m = c["model"]
                shape = model_shape(m)
                name = c["name"] + (f" (= {', '.join(c['also'])})" if c.get("also") else "")
                print(f"  {name:<12} {shape:<38} predicted {c['predicted_loss']:.4f}"
                      + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")
                      + (f"  measured {c['measured_mean']:.4f}" if c["measured_mean"] is not None else "  not measured")
                      + (f" +- {c['measured_std']:.4f}" if c["measured_std"] is not None else "")
                      + (f"  {c['steps']:,} steps, {c['epochs']:.2g} epochs" if "steps" in c else ""))
            if v.get("planned"):
                print(f"planned, not trained: {v['steps']:,} optimizer steps over {v['seeds']} seed(s); binding "
                      f"{', '.join(v['binding'])}, memory use {v['memory_use']:.0%}, space bounds "
                      f"{', '.join(v['space_bounds']) or 'none'}; wrote {v['grid']}")
            else:
                print(f"noise floor {v['noise_floor']}, spearman {v['spearman']}, predicted best is measured best: "
                      f"{v['predicted_best_is_measured_best']}, within interval: {v['within_interval']}, "
                      f"optimum gap {v['optimum_gap']}, concordance {v['concordance']}, extrapolation "
                      f"{v['extrapolation']}, binding {', '.join(v['binding'])}, memory use {v['memory_use']:.0%}")
                print(f"wrote {args.validate}/validation.json")
            print("targets (issue 23, item 5): " + ("all met" if v["verdict"]["passed"]
                                                   else "unmet: " + "; ".join(v["verdict"]["unmet"])))
        for name, paths in result.get("plots", {}).items():
            print(f"figure {name}: {', '.join(paths)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``moe-fit`` entry point: exit 0 on success, 2 on bad input (one line), 1 on internal failure."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
