"""``moe-sweep``: validate a grid file, run a sweep (crash-safe, many workers), show its status."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from moe_scaling.units import format_count, format_duration
from moe_scaling.cli._common import make_parser, print_json, run_cli
from moe_scaling.errors import InputError
from moe_scaling.cli.plot import add_sweep_plot_parser, sweep_plot_main

PROG = "moe-sweep"
EXAMPLES = """\
  moe-sweep validate sweeps/quickstart.yaml
  moe-sweep run sweeps/quickstart.yaml --out build/quickstart
  moe-sweep run sweeps/quickstart.yaml --out build/quickstart --workers 2
  moe-sweep run sweeps/quickstart.yaml --out build/quickstart --only "n_shared == 0"   # a subset first
  moe-sweep run sweeps/sparsity_granularity.yaml --out results/sg \\
      --storage postgresql://user:password@dbhost:5432/sweeps     # same command on every machine
  moe-sweep status build/quickstart
  moe-sweep status build/quickstart --json
  moe-sweep dashboard results/quickstart --port 8080   # optuna-dashboard (pip install -e ".[dashboard]")
  moe-sweep plot results/quickstart                # figures into results/quickstart/plots/

After a crash or kill, rerun the same `run` command: finished runs are skipped and interrupted ones
resume from their last checkpoint (`status` counts them as interrupted until then). Exit codes: 0
every run completed or diverged, 2 bad grid or arguments (one line naming the run, field and value;
nothing written), 1 internal failure, runs left unfinished, or runs that failed (`moe-sweep status`
shows their errors; fix the cause and rerun with --retry-failed)."""


def _parser():
    p = make_parser(PROG, "Grid sweeps over MoE architectures: every run once, across workers and "
                    "restarts, recorded in DIR/runs.parquet and DIR/curves.parquet.", EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, metavar="{validate,run,status,plot,dashboard}")
    v = sub.add_parser("validate", help="check a grid file, list its runs and estimate their time "
                       "(writes nothing)")
    v.add_argument("grid", help="grid YAML file")
    v.add_argument("--only", metavar="EXPR", help="list only the runs for which EXPR holds (as `run --only`)")
    v.add_argument("--json", action="store_true", help="print the runs as JSON")
    r = sub.add_parser("run", help="run (or continue) a sweep")
    r.add_argument("grid", help="grid YAML file")
    r.add_argument("--out", required=True, help="sweep folder (results, checkpoints, default storage)")
    r.add_argument("--workers", type=_positive, default=1, help="local worker processes (default 1)")
    r.add_argument("--storage", help="optuna storage URL shared by all workers "
                   "(default sqlite:///OUT/sweep.db)")
    r.add_argument("--retry-failed", action="store_true",
                   help="run again the runs that failed with an exception")
    r.add_argument("--grace-period", type=_positive, default=60, metavar="S",
                   help="seconds without a heartbeat after which another host's run counts as dead "
                        "(default 60; dead local processes are noticed at once)")
    r.add_argument("--no-batch", dest="batch", action="store_false",
                   help="train every run on its own (default: runs that differ only in seed, lr, "
                        "min_lr_ratio or weight_decay train together as one vmapped program)")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.add_argument("--devices-per-run", type=_positive, default=None, metavar="K",
                   help="give each worker its own K accelerators (CUDA_VISIBLE_DEVICES, ...; K host "
                        "devices on CPU); default: workers see every device")
    r.add_argument("--only", metavar="EXPR", help="train only the runs for which EXPR holds (exclude's "
                   "language, e.g. \"tokens < 1e7 and seed == 0\"); the others wait for a run without it")
    r.add_argument("--json", action="store_true", help="print the final status as JSON")
    s = sub.add_parser("status", help="status counts and best runs of a sweep folder")
    s.add_argument("out", help="sweep folder given to `run --out`")
    s.add_argument("--top", type=_positive, default=5, help="how many best runs to list (default 5)")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_sweep_plot_parser(sub)
    d = sub.add_parser("dashboard", help="optuna-dashboard on the sweep's storage, while it runs or after "
                       "(the dashboard extra)")
    d.add_argument("out", help="sweep folder given to `run --out`")
    d.add_argument("--storage", help="the storage URL given to `run` (default: the one in OUT/sweep.json; "
                   "a server's password is not stored there)")
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    d.add_argument("--port", type=_positive, default=8080, help="port (default 8080)")
    for command in sub.choices.values():   # every subcommand's --help ends with the examples too
        command.epilog, command.formatter_class = p.epilog, p.formatter_class
    return p


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _body(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args)
    if args.command == "run":
        return _run(args)
    if args.command == "plot":
        return sweep_plot_main(args)
    if args.command == "dashboard":
        from moe_scaling.sweep.dashboard import serve
        serve(args.out, args.storage, host=args.host, port=args.port)
        return 0
    return _status(args)


def _validate(args) -> int:
    from moe_scaling.costs import param_counts
    from moe_scaling.sweep.estimate import estimate_sweep
    from moe_scaling.sweep.runner import plan_sweep

    plan = plan_sweep(args.grid, only=args.only)
    rows = []
    for run in plan.runs:
        counts = param_counts(run.model)
        rows.append({"run_id": run.run_id, "index": run.index,
                     "axes": {k.split(".")[-1]: v for k, v in run.axes.items()},
                     "n_experts": run.model.n_experts, "top_k": run.model.top_k,
                     "d_expert": run.model.d_expert, "n_shared": run.model.n_shared,
                     "params_total": counts.total, "params_active": counts.active,
                     "steps": run.train.steps(run.data.seq_len)})
    estimate = estimate_sweep(plan.runs)
    if args.json:
        print_json({"name": plan.spec.name, "runs": rows, "estimate": estimate})
        return 0
    print(f"{plan.spec.name}: {len(rows)} runs, valid")
    for row in rows:
        axes = ", ".join(f"{k}={v}" for k, v in row["axes"].items())
        print(f"  {row['run_id']}  experts {row['n_experts']:>3} top_k {row['top_k']:>2} "
              f"d_expert {row['d_expert']:>5} shared {row['n_shared']}  active {format_count(row['params_active'])} "
              f"total {format_count(row['params_total'])}  steps {row['steps']}  ({axes})")
    together = (f"{len(rows)} runs as {estimate['groups']} programs: runs that differ only in seed or lr "
                f"train together, up to {estimate['largest_group']} at a time" if estimate["groups"] < len(rows)
                else "no runs to train together")
    print(f"estimated time with one worker on a 2-core CPU: {format_duration(estimate['batched_s'])} "
          f"({together}); {format_duration(estimate['sequential_s'])} with --no-batch")
    return 0


def _run(args) -> int:
    from moe_scaling.sweep.queue import check_storage_url
    from moe_scaling.sweep.runner import plan_sweep, run_sweep

    plan = plan_sweep(args.grid, only=args.only)   # a bad grid stops here, before anything is written
    if args.storage:
        check_storage_url(args.storage)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; give a folder path")
    summary = run_sweep(args.grid, out, workers=args.workers, storage=args.storage,
                        retry_failed=args.retry_failed, grace_s=args.grace_period,
                        report=None if args.quiet else ProgressLine(), plan=plan, batch=args.batch,
                        devices_per_run=args.devices_per_run,
                        log=lambda note: print(f"{PROG}: {note}", file=sys.stderr, flush=True))
    status = _summary(out, top=5)
    if args.json:
        print_json(summary | {"status": status})
    else:
        _print_status(status)
    code = 0
    if summary["unfinished"]:
        print(f"{PROG}: {summary['unfinished']} run(s) unfinished (a worker died?); rerun the same "
              "command to continue", file=sys.stderr)
        code = 1
    if summary["failed"]:
        ids = summary["failed"]
        print(f"{PROG}: {len(ids)} run(s) failed ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}); "
              f"`{PROG} status {out}` shows why; fix the cause and rerun with --retry-failed", file=sys.stderr)
        code = 1
    return code


class ProgressLine:
    """Prints progress snapshots as ``runs 3/8 done | <run_id> step 40/200 loss 3.412 9.8k tok/s |
    ETA 2m10s`` on stderr: rewritten in place on a terminal; elsewhere (logs, pipes) one line when a
    run starts or the done count changes and at most every ``every`` seconds otherwise, plus a line
    for every run that ends in this process."""

    def __init__(self, stream: Any = None, every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every, self.last, self.done = every, 0.0, None

    def __call__(self, snap: dict[str, Any]) -> None:
        event, now = snap.get("event"), time.time()
        clear = "\r\033[K" if self.tty else ""
        if isinstance(event, dict):
            loss = event.get("eval_loss")
            tail = f"eval loss {loss:.4f}" if isinstance(loss, float) else event.get("error") or ""
            self.stream.write(f"{clear}{event['run_id']} {event['status']} {tail}".rstrip() + "\n")
        elif self.tty:
            self.stream.write(clear + self.format(snap))
        elif event == "start" or snap["done"] != self.done or now - self.last >= self.every:
            self.stream.write(self.format(snap) + "\n")
        else:
            return
        self.last, self.done = now, snap["done"]
        self.stream.flush()

    @staticmethod
    def format(snap: dict[str, Any]) -> str:
        parts = [f"runs {snap['done']}/{snap['total']} done"]
        for s in snap["states"]:
            text = f"{s['run_id']} step {s.get('step') or 0}/{s.get('steps') or '?'}"
            if s.get("loss") is not None:
                text += f" loss {s['loss']:.3f}"
            if s.get("tokens_per_s"):
                text += f" {s['tokens_per_s'] / 1e3:.1f}k tok/s"
            parts.append(text)
        if snap.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(snap['eta_s'])}")
        return " | ".join(parts)


def _summary(out: Path, top: int) -> dict[str, Any]:
    from moe_scaling.sweep.results import summarize

    return summarize(out, top=top)


def _status(args) -> int:
    out = Path(args.out)
    if not out.is_dir():
        raise InputError(f"{out}: no such sweep folder; give the --out folder of a moe-sweep run")
    status = _summary(out, args.top)
    if args.json:
        print_json(status)
    else:
        _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    counts = status["counts"]
    print(f"sweep {status['sweep']} ({status['out']}): {status['total']} runs: "
          + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    if status["best"]:
        print("best runs (final eval loss):")
        print(f"  {'run_id':<12}  {'eval_loss':>9}  {'experts':>7}  {'top_k':>5}  {'G':>4}  {'shared':>6}  "
              f"{'active':>7}  {'total':>7}")
        for r in status["best"]:
            print(f"  {r['run_id']:<12}  {_num(r['eval_loss']):>9}  {r['n_experts']:>7}  {r['top_k']:>5}  "
                  f"{r['granularity']:>4g}  {r['n_shared']:>6}  {format_count(r['params_active']):>7}  "
                  f"{format_count(r['params_total']):>7}")
    for r in status["problems"]:
        detail = (f"at step {r['diverged_step']} (last good loss {_num(r['last_good_loss'])})"
                  if r["status"] == "diverged" else r.get("error") or "")
        print(f"  {r['run_id']} {r['status']} {detail}")


def _num(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _body, argv)


def console() -> None:
    """The ``moe-sweep`` console script: :func:`main`, then :func:`moe_scaling.runtime.exit_now`
    (the interpreter's teardown after training cost ~1 s per sweep)."""
    from moe_scaling.runtime import exit_now

    exit_now(main())


if __name__ == "__main__":
    console()
