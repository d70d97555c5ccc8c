"""``moe-train``: train a built model through its recipe (or a run YAML), on a device mesh, across
processes; ``--plan`` sizes the full-size step per device without allocating it."""

from __future__ import annotations

import re
import sys
from typing import Sequence

from moe_scaling.cli._common import make_parser, print_json, result_stdout, run_cli
from moe_scaling.errors import ConfigError

EXAMPLES = """\
  moe-build --active 20M --total 40M --granularity 2 --tokenizer bpe:2048 --out build/tiny
  moe-train build/tiny --out runs/tiny --tokens 200000 --batch-size 8 --seq-len 64 \\
      --data pretraining=../shared/data/text/tinystories --data midtraining=../shared/data/text/gutenberg
  # stages 3-4 after 1-2 in the same OUT: instruction tuning on chat JSONL, then INT4 QAT
  moe-train build/tiny --out runs/tiny --stages instruction_finetuning,quantization_aware_training \
      --tokens 1e5 --batch-size 4 --seq-len 128 --data instruction_finetuning=tests/data/chat.jsonl
  moe-train run.yaml --out runs/demo --mesh data=2,expert=2          # XLA_FLAGS=--xla_force_host_platform_device_count=4 on CPU
  moe-train build/mobilemoe-l --plan --mesh fsdp=8 --batch-size 8 --seq-len 4096 --device-memory 80GB --json
  # two machines (or processes): the same command with --process-id 0 and 1
  moe-train run.yaml --out runs/demo --mesh data=4 --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0
"""


def _stage_values(items: list[str] | None, flag: str, cast=str) -> dict:
    out = {}
    for item in items or []:
        m = re.fullmatch(r"([A-Za-z_][\w]*)=(.+)", item)
        if flag == "--data" and not m:
            out["*"] = item             # a corpus for every stage
            continue
        if not m:
            raise ConfigError(f"{flag} = {item!r}: write STAGE=VALUE, e.g. {flag} midtraining=2")
        try:
            out[m[1]] = cast(m[2])
        except ValueError:
            raise ConfigError(f"{flag} = {item!r}: {m[2]!r} is not a whole number") from None
    return out


def _count(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    from moe_scaling.units import parse_count
    value = parse_count(text, field=flag)
    if value < 1 or value != int(value):
        raise ConfigError(f"{flag} = {text!r}: must be a whole number >= 1, e.g. 2e6 or 500K")
    return int(value)


def _body(argv: Sequence[str] | None) -> int:
    parser = make_parser("moe-train", "Train a model directory written by moe-build / moe-fit --emit "
                         "(model.yaml + recipe.yaml: pretraining, midtraining, instruction_finetuning, "
                         "quantization_aware_training) or a run YAML "
                         "(model/train/data). Progress goes to stderr; an interrupted run resumes when "
                         "the same command runs again.", EXAMPLES)
    parser.add_argument("target", metavar="TARGET", help="a moe-build directory or a run YAML")
    parser.add_argument("--out", metavar="DIR", help="run folder (required unless --plan)")
    parser.add_argument("--stages", help="comma-separated stages to run (default: pretraining and midtraining, "
                                         "plus instruction_finetuning and quantization_aware_training when "
                                         "--data instruction_finetuning=CHAT.jsonl is given)")
    parser.add_argument("--data", action="append", metavar="STAGE=CORPUS",
                        help="a stage's corpus (repeatable); a bare CORPUS is every stage's (default stdlib; "
                             "a stage without one uses the first stage's)")
    parser.add_argument("--tokens", help="total training tokens, split across the stages in the recipe's proportions")
    parser.add_argument("--batch-size", type=int, help="every stage's batch size (sequences)")
    parser.add_argument("--seq-len", type=int, help="every stage's sequence length")
    parser.add_argument("--tokenizer", help="byte, bpe:N or a tokenizer.json path (default: the one moe-build "
                                             "--tokenizer recorded in recipe.yaml, else byte); its number of ids "
                                             "must be the model's vocab_size (moe-build --tokenizer/--vocab sets it)")
    parser.add_argument("--mesh", help="data=D,fsdp=F,expert=X (default: one device)")
    parser.add_argument("--dispatch", help="MoE dispatch: auto, capacity, dropless, ragged, reference")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="matmul compute dtype")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator (process 0's address)")
    parser.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's id, 0..N-1 (with --coordinator)")
    parser.add_argument("--ckpt-every", type=int, metavar="N",
                        help="checkpoint every N steps in every stage (default: the train config's, 200); "
                             "an interrupted stage resumes from its newest checkpoint, with any --ckpt-every")
    parser.add_argument("--stop-at-step", action="append", metavar="STAGE=N",
                        help="stop STAGE after N steps, as if interrupted (rerun to resume)")
    parser.add_argument("--plan", action="store_true", help="compile the full-size step on abstract arrays and "
                        "print per-device memory; trains nothing")
    parser.add_argument("--device-memory", help="with --plan: the memory of one device, e.g. 80GB")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    with result_stdout() as out:        # stdout: only the result (multi-process gloo chatter -> stderr)
        return _run(args, out)


def _run(args, out) -> int:
    from moe_scaling.config import MeshShape
    from moe_scaling.train.mesh import distributed_from_env, initialize_distributed

    dist = distributed_from_env(args.coordinator, args.num_processes, args.process_id)
    mesh = MeshShape.parse(args.mesh, field="--mesh")
    if args.plan and mesh.size > 1:
        # the plan compiles for XLA:CPU host devices, as many as the mesh has (before JAX starts)
        import jax
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", mesh.size)
    if args.device_memory and not args.plan:
        raise ConfigError("--device-memory: only with --plan; add --plan or drop it")
    if not args.plan and not args.out:
        raise ConfigError("--out: required to train; give the run folder, e.g. --out runs/demo")
    for flag in ("batch_size", "seq_len", "ckpt_every"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} = {v}: must be >= 1")
    from moe_scaling.train.recipe import Overrides, load_target, run_plan

    ov = Overrides(stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None,
                   tokens=_count(args.tokens, "--tokens"), batch_size=args.batch_size, seq_len=args.seq_len,
                   data=_stage_values(args.data, "--data"), tokenizer=args.tokenizer, mesh=args.mesh,
                   dispatch=args.dispatch, dtype=args.dtype, ckpt_every=args.ckpt_every)
    plan = load_target(args.target, ov)     # every config checked before JAX starts or a file is written
    if args.plan:
        from moe_scaling.train.plan import format_plan, memory_plan
        from moe_scaling.units import parse_bytes
        budget = parse_bytes(args.device_memory, field="--device-memory") if args.device_memory else None
        report = memory_plan(plan.stages[0], device_memory=budget)
        print_json(report, out) if args.json else print(format_plan(report), file=out)
        return 0
    stop_at = _stage_values(args.stop_at_step, "--stop-at-step", int)
    if dist is not None:
        initialize_distributed(*dist)
    import jax
    summary = run_plan(plan, args.out, stop_at=stop_at,
                       log=(lambda m: print(m, file=sys.stderr, flush=True)) if jax.process_index() == 0
                       else (lambda m: None))
    if jax.process_index() == 0:
        if args.json:
            print_json(summary, out)
        else:
            for s in summary["stages"]:
                print(f"{s['name']}: {s['status']}, {s['steps']} steps, {s['tokens']:,} tokens, "
                      f"eval loss {s['final_eval_loss']}", file=out)
    return 1 if any(s["status"] == "diverged" for s in summary["stages"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("moe-train", _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
