"""Training a model through its recipe: the stages of a ``moe-build`` directory's ``recipe.yaml``
(or the one stage of a run YAML), each from the previous stage's final weights.

:func:`load_target` reads a TARGET (a directory with ``model.yaml`` + ``recipe.yaml``, or a run
YAML with ``model``/``train``/``data`` sections) into a :class:`Plan`: one :class:`Stage` (model,
train and data configs) per stage to run, after the overrides of :class:`Overrides`
(``--tokens``, ``--batch-size``, ``--seq-len``, ``--data``, ``--tokenizer``, ``--mesh``,
``--ckpt-every``, ...).
:func:`run_plan` trains them in order into ``OUT``::

    OUT/train.json                the plan and every stage's result (written after each stage)
    OUT/curves.json               every stage's loss curve, one row per logged step with its stage
    OUT/tokenizer.json            the tokenizer, when it is not ``byte`` (moe-export copies it)
    OUT/stages/<stage>/           a RunDir: config.yaml, record.json, curve.json, ckpt/

Stages this version runs (:data:`STAGE_RUNNERS`):

* ``pretraining``: warmup then constant learning rate (``schedule: constant``; the warmup keeps
  its share of the recipe's stage tokens when ``--tokens`` rescales them).
* ``midtraining``: its own data, the learning rate decaying linearly from the recipe's rate to
  zero over the stage (``schedule: wsd`` with ``decay_fraction: 1`` and ``min_lr_ratio: 0``).
  It starts from pre-training's final model weights (parameters and router biases) with fresh
  AdamW moments.

* ``instruction_finetuning``: chat-format JSONL given with ``--data instruction_finetuning=CHAT.jsonl``
  (:mod:`moe_scaling.train.sft`: the loss on assistant tokens only, packed rows), cosine schedule with
  the recipe's warmup fraction; from the previous stage's final model with fresh AdamW moments.
* ``quantization_aware_training``: INT4 group-32 fake-quantized weights with straight-through
  gradients (:mod:`moe_scaling.train.qat`) on its own ``--data``, else the first stage's corpus (when
  it runs without the language-model stages: mid-training's corpus in ``OUT``, else pre-training's),
  constant schedule after the recipe's warmup; its eval loss is that of the INT4 model.

Each runner (:data:`STAGE_RUNNERS`) is a function of the stage, its folder and the previous stage's
checkpoint folder. When the plan starts at a later stage, the previous one is the latest earlier
recipe stage already trained in ``OUT``. Every stage checkpoints every ``ckpt_every`` steps; one
that was interrupted resumes from its own newest checkpoint when the same command runs again
(bit-exactly; all four share :func:`moe_scaling.train.loop.resume_and_train`). A completed stage
is not trained again. A ``bpe:N`` tokenizer is trained on the first
stage's corpus and every later stage uses that same file (``OUT/tokenizer.json``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from moe_scaling.config import DataConfig, MeshShape, ModelConfig, TrainConfig, load_config, read_mapping
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_write_text, finite_or_none
from moe_scaling.train.rundir import RunDir

__all__ = ["Stage", "Plan", "Overrides", "load_target", "run_plan", "STAGE_RUNNERS", "RECIPE_STAGES"]

RECIPE_STAGES = ("pretraining", "midtraining", "instruction_finetuning", "quantization_aware_training")
SFT_STAGE, QAT_STAGE = RECIPE_STAGES[2], RECIPE_STAGES[3]
RUN_YAML_STAGE = "train"


@dataclass(frozen=True)
class Stage:
    name: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig


@dataclass(frozen=True)
class Plan:
    source: str
    stages: tuple[Stage, ...]
    defaulted: frozenset[str] = frozenset()   # stages whose corpus no --data named


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that replace the recipe's (``None``: keep the recipe's)."""

    stages: tuple[str, ...] | None = None
    tokens: int | None = None          # total over the stages run, split in the recipe's proportions
    batch_size: int | None = None
    seq_len: int | None = None
    data: Mapping[str, str] = field(default_factory=dict)   # stage (or "*") -> corpus
    tokenizer: str | None = None
    mesh: str | None = None
    dispatch: str | None = None
    dtype: str | None = None
    ckpt_every: int | None = None      # every stage's checkpoint interval in steps


def _stage_train(raw: Mapping[str, Any], name: str, tokens: int, batch: int, seq: int,
                 model: ModelConfig, ov: Overrides) -> TrainConfig:
    """The TrainConfig of a recipe stage (pretraining / midtraining) at ``tokens``."""
    sched = raw.get("schedule") or {}
    common = dict(tokens=tokens, batch_size=batch, lr=float(raw["lr"]),
                  weight_decay=float(raw.get("weight_decay", 0.1)), beta1=float(raw.get("beta1", 0.9)),
                  beta2=float(raw.get("beta2", 0.95)), grad_clip=float(raw.get("grad_clip", 1.0)),
                  aux_loss_coef=float(raw.get("aux_loss_coef", 0.01)),
                  z_loss_coef=float(raw.get("z_loss_coef", 1e-3)),
                  bias_update_rate=1e-3 if raw.get("router_bias_update") and model.router_bias else 0.0,
                  mesh=ov.mesh)
    for key in ("dispatch", "dtype", "ckpt_every"):
        if getattr(ov, key):
            common[key] = getattr(ov, key)
    if name == "pretraining":
        warm = float(sched.get("warmup_tokens", 0.0)) / max(float(raw["tokens"]), 1.0)
        return TrainConfig(schedule="constant", warmup=min(warm, 0.5), **common)
    if name == "instruction_finetuning":
        return TrainConfig(schedule="cosine", warmup=float(sched.get("warmup_fraction", 0.03)),
                           min_lr_ratio=float(sched.get("min_lr_ratio", 0.0)), **common)
    if name == "quantization_aware_training":
        return TrainConfig(schedule="constant", warmup=float(sched.get("warmup_fraction", 0.0)), **common)
    return TrainConfig(schedule="wsd", warmup=0, decay_fraction=1.0, min_lr_ratio=0.0, **common)


def _recipe_plan(target: Path, ov: Overrides) -> Plan:
    model = ModelConfig.from_dict((read_mapping(target / "model.yaml").get("model")
                                   or read_mapping(target / "model.yaml")))
    recipe = read_mapping(target / "recipe.yaml")
    raw_stages = recipe.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{target / 'recipe.yaml'}: no stages; rebuild it with moe-build")
    by_name = {s.get("name"): s for s in raw_stages}
    # default: every stage this version runs whose data is at hand (stage 3 needs chat data; stage 4
    # follows it)
    names = ov.stages or tuple(n for n in by_name if n in STAGE_RUNNERS
                               and (n not in (SFT_STAGE, QAT_STAGE) or SFT_STAGE in ov.data))
    for n in names:
        if n not in by_name:
            raise ConfigError(f"--stages: {n!r} is not a stage of {target / 'recipe.yaml'}; "
                              f"its stages are {', '.join(map(str, by_name))}")
        if n not in STAGE_RUNNERS:
            raise ConfigError(f"--stages: {n!r} cannot run in this version; run --stages "
                              f"{','.join(s for s in by_name if s in STAGE_RUNNERS)}")
    order = [n for n in by_name if n in names]
    _check_data_keys(ov, order)
    if SFT_STAGE in order:
        chat = ov.data.get(SFT_STAGE)
        if not chat:
            raise ConfigError(f"--stages includes {SFT_STAGE}: give its chat data with --data "
                              f"{SFT_STAGE}=CHAT.jsonl (one {{\"messages\": [...]}} per line), or leave the stage out")
        from moe_scaling.train.sft import load_chat
        load_chat(chat)                       # a bad file is refused before any stage trains
    tokenizer = ov.tokenizer or _recipe_tokenizer(target, recipe)
    total = sum(float(by_name[n]["tokens"]) for n in order)
    stages = []
    first_corpus = None
    defaulted = set()
    for n in order:
        raw = by_name[n]
        seq = ov.seq_len or int(raw["seq_len"])
        batch = ov.batch_size or int(raw["batch_size"])
        tokens = int(ov.tokens * float(raw["tokens"]) / total) if ov.tokens else int(float(raw["tokens"]))
        if n != SFT_STAGE and not (ov.data.get(n) or ov.data.get("*")):
            defaulted.add(n)
        corpus = (ov.data.get(n) if n == SFT_STAGE else
                  ov.data.get(n) or ov.data.get("*") or first_corpus or DataConfig().corpus)
        first_corpus = first_corpus or (None if n == SFT_STAGE else corpus)
        stage_model = model if seq <= model.max_seq_len else dataclasses.replace(model, max_seq_len=seq)
        data = DataConfig(corpus=corpus, seq_len=seq, tokenizer=tokenizer)
        stages.append(Stage(n, stage_model, _stage_train(raw, n, tokens, batch, seq, stage_model, ov), data))
    return Plan(str(target), tuple(stages), frozenset(defaulted))


def _recipe_tokenizer(target: Path, recipe: Mapping[str, Any]) -> str:
    """The tokenizer ``moe-build --tokenizer`` recorded (a file name is relative to the build
    directory); ``byte`` when the recipe names none."""
    spec = recipe.get("tokenizer") or "byte"
    from moe_scaling.train.tokenizers import parse_tokenizer
    kind, _ = parse_tokenizer(spec, field=f"{target / 'recipe.yaml'}: tokenizer")
    return str((target / spec).absolute()) if kind == "file" else spec


def _check_data_keys(ov: Overrides, names: list[str]) -> None:
    for key in ov.data:
        if key != "*" and key not in names:
            raise ConfigError(f"--data {key}=...: no stage {key!r} runs; stages: {', '.join(names)}")


def _run_yaml_plan(target: Path, ov: Overrides) -> Plan:
    model, train, data = load_config(target)
    if ov.stages and tuple(ov.stages) != (RUN_YAML_STAGE,):
        raise ConfigError(f"--stages: a run YAML has one stage, {RUN_YAML_STAGE!r}; drop --stages")
    _check_data_keys(ov, [RUN_YAML_STAGE])
    t = {k: v for k, v in dict(tokens=ov.tokens, batch_size=ov.batch_size, mesh=ov.mesh, dispatch=ov.dispatch,
                                dtype=ov.dtype, ckpt_every=ov.ckpt_every).items() if v is not None}
    d = {k: v for k, v in dict(seq_len=ov.seq_len, tokenizer=ov.tokenizer,
                                corpus=ov.data.get(RUN_YAML_STAGE) or ov.data.get("*")).items() if v is not None}
    return Plan(str(target), (Stage(RUN_YAML_STAGE, model, dataclasses.replace(train, **t),
                                    dataclasses.replace(data, **d)),))


def load_target(target: str | Path, overrides: Overrides = Overrides()) -> Plan:
    """The :class:`Plan` of a ``moe-build`` directory or a run YAML (one-line ConfigError otherwise)."""
    path = Path(target)
    if path.is_dir():
        missing = [f for f in ("model.yaml", "recipe.yaml") if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"TARGET = {str(target)!r}: a directory without {' and '.join(missing)}; give a "
                              "moe-build / moe-fit --emit directory or a run YAML")
        plan = _recipe_plan(path, overrides)
    elif path.is_file():
        plan = _run_yaml_plan(path, overrides)
    else:
        raise ConfigError(f"TARGET = {str(target)!r}: no such file or directory; give a moe-build directory "
                          "or a run YAML")
    for s in plan.stages:
        s.train.steps(s.data.seq_len)          # at least one batch per stage, checked up front
    return plan


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def _lm_stage(stage: Stage, run_dir: RunDir, init_from: Path | None, *, stop_at_step: int | None,
              on_log: Callable | None):
    """Pre-training and mid-training: next-token training with :func:`moe_scaling.train.loop.train`."""
    from moe_scaling.train.loop import train

    return train(stage.model, stage.train, stage.data, ckpt_dir=run_dir.ckpt, progress=False,
                 on_log=on_log, stop_at_step=stop_at_step, init_from=init_from, events_dir=run_dir.events)


def _needs_previous(stage: Stage, init_from: Path | None) -> None:
    if init_from is None:
        raise ConfigError(f"stage {stage.name}: starts from a trained model; run pretraining/midtraining "
                          "first (in this OUT) or include them in --stages")


def _sft_stage(stage: Stage, run_dir: RunDir, init_from: Path | None, *, stop_at_step: int | None,
               on_log: Callable | None):
    """Instruction fine-tuning (:func:`moe_scaling.train.sft.sft`) from the previous stage's model."""
    from moe_scaling.train.sft import sft

    _needs_previous(stage, init_from)
    return sft(stage.model, stage.train, stage.data, init_from, ckpt_dir=run_dir.ckpt, on_log=on_log,
               stop_at_step=stop_at_step, events_dir=run_dir.events)


def _qat_stage(stage: Stage, run_dir: RunDir, init_from: Path | None, *, stop_at_step: int | None,
               on_log: Callable | None):
    """INT4 quantization-aware training (:func:`moe_scaling.train.qat.qat`); the checkpoints hold the
    float latent weights (quantize them to deploy); eval losses are the INT4 model's."""
    from moe_scaling.train.qat import qat

    _needs_previous(stage, init_from)
    return qat(stage.model, stage.train, stage.data, init_from, ckpt_dir=run_dir.ckpt,
               stop_at_step=stop_at_step, on_log=on_log, events_dir=run_dir.events).result


# stage name -> runner(stage, run_dir, previous stage's checkpoint folder, stop_at_step=, on_log=)
STAGE_RUNNERS: dict[str, Callable] = {"pretraining": _lm_stage, "midtraining": _lm_stage,
                                      SFT_STAGE: _sft_stage, QAT_STAGE: _qat_stage,
                                      RUN_YAML_STAGE: _lm_stage}


def _earlier_checkpoint(out: Path, first: str) -> Path | None:
    """The checkpoint folder of the latest recipe stage before ``first`` already trained in ``out``."""
    if first not in RECIPE_STAGES:
        return None
    for name in reversed(RECIPE_STAGES[:RECIPE_STAGES.index(first)]):
        ckpt = RunDir(out / "stages" / name).ckpt
        if ckpt.is_dir() and any(ckpt.iterdir()):
            return ckpt
    return None


def _write_tokenizer(plan: Plan, out: Path) -> None:
    """Resolve the first stage's tokenizer (training a ``bpe:N`` on its corpus), check it against
    the model and keep it as ``OUT/tokenizer.json``."""
    if plan.stages[0].data.tokenizer == "byte":
        return
    from moe_scaling.train.data import tokenizer_for
    from moe_scaling.train.tokenizers import check_vocab

    tok = tokenizer_for(plan.stages[0].data)
    check_vocab(plan.stages[0].model.vocab_size, tok)
    dest = out / "tokenizer.json"
    if not dest.is_file() or dest.read_text() != tok.json_text:
        atomic_write_text(dest, tok.json_text)


def run_plan(plan: Plan, out: str | Path, *, stop_at: Mapping[str, int] | None = None,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any]:
    """Train ``plan``'s stages in order into ``out``; the summary that ``moe-train --json`` prints."""
    import jax

    from moe_scaling.runtime import enable_compilation_cache

    out = Path(out)
    primary = jax.process_index() == 0
    enable_compilation_cache(out / "jax_cache")
    previous: Path | None = _earlier_checkpoint(out, plan.stages[0].name)
    tok_file = out / "tokenizer.json"
    if previous is None or not tok_file.is_file():
        _write_tokenizer(plan, out)  # every process: each reads the same file below
    # else: the earlier stages' tokenizer stays (a later stage never retrains it on its own data)
    mesh = MeshShape.parse(plan.stages[0].train.mesh)
    summary: dict[str, Any] = {"target": plan.source, "out": str(out), "stages": [], "mesh": str(mesh),
                               "devices": mesh.size, "processes": jax.process_count()}
    curves: list[dict] = []
    for stage in plan.stages:
        data = stage.data
        if stage.name in plan.defaulted and stage.name == QAT_STAGE and not any(
                s.name in RECIPE_STAGES[:2] for s in plan.stages):
            # QAT replays the language-model data: the latest earlier LM stage's corpus in OUT
            for name in reversed(RECIPE_STAGES[:2]):
                cfg = RunDir(out / "stages" / name).config
                if cfg.is_file():
                    data = dataclasses.replace(data, corpus=yaml.safe_load(cfg.read_text())["data"]["corpus"])
                    stage = dataclasses.replace(stage, data=data)
                    break
        if previous is not None:
            # later stages use the first stage's tokenizer (a BPE trained on its corpus), never one of
            # their own: OUT/tokenizer.json when the run has one, else bytes
            data = dataclasses.replace(data, tokenizer=str(tok_file.absolute()) if tok_file.is_file() else "byte")
            stage = dataclasses.replace(stage, data=data)
        run_dir = RunDir(out / "stages" / stage.name)
        if primary:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir.config, yaml.safe_dump(
                {"model": stage.model.to_dict(), "train": stage.train.to_dict(), "data": stage.data.to_dict()},
                sort_keys=False))
        steps = stage.train.steps(data.seq_len)
        log(f"stage {stage.name}: {stage.train.tokens:,} tokens, {steps} steps of {stage.train.batch_size} x "
            f"{data.seq_len}, lr {stage.train.lr:g} ({stage.train.schedule}), corpus {data.corpus}")

        def on_log(row, name=stage.name):
            if "train_loss" in row:
                log(f"  {name} step {row['step']}/{row['steps']}: train loss {row['train_loss']:.4f}, "
                    f"{row['tokens_per_s']:,.0f} tokens/s")
            else:
                log(f"  {name} step {row['step']}/{row['steps']}: eval loss {row['eval_loss']:.4f}")

        result = STAGE_RUNNERS[stage.name](stage, run_dir, previous,
                                           stop_at_step=(stop_at or {}).get(stage.name), on_log=on_log)
        row = {"name": stage.name, "tokens": result.tokens, "steps": result.steps,
               "final_train_loss": result.final_train_loss, "final_eval_loss": result.final_eval_loss,
               "status": result.status}
        summary["stages"].append(row)
        curves += [{"stage": stage.name, **r} for r in result.curve]
        if primary:
            atomic_write_text(run_dir.record, json.dumps(finite_or_none(
                {**row, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
                 "metrics": result.metrics}), indent=2) + "\n")
            atomic_write_text(run_dir.curve, json.dumps(finite_or_none(result.curve)) + "\n")
            atomic_write_text(out / "curves.json", json.dumps(finite_or_none(curves)) + "\n")
            atomic_write_text(out / "train.json", json.dumps(finite_or_none(summary), indent=2) + "\n")
        log(f"stage {stage.name}: {result.status} at step {result.steps}, eval loss "
            f"{result.final_eval_loss if result.final_eval_loss is None else round(result.final_eval_loss, 4)}")
        if result.status != "completed":
            break                      # a later stage starts only from a finished one
        previous = run_dir.ckpt
    return summary
