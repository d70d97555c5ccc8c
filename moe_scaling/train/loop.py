"""Training: one configuration to its token budget, with periodic eval, exact resume and divergence.

One module (~530 lines): ``train`` and the stages 3-4 share ``resume_and_train`` and its run state
(resume, eval, checkpoints, logs, events); the step maths lives in step.py, checkpoints in checkpoints.py.

:func:`train` runs one configuration and returns a :class:`TrainResult`. The step math (schedule,
optimiser, loss, router-bias update, jitted steps) is :mod:`moe_scaling.train.step`; checkpoints
are :mod:`moe_scaling.train.checkpoints`.

* The train step is compiled ahead of time so ``step_time_s`` counts only the steps.
* ``train_loss`` in the curve is the cross-entropy alone (no auxiliary losses).
* Eval: mean cross-entropy over a fixed held-out set (``eval_batches`` batches of evenly spaced
  validation windows, :func:`moe_scaling.train.data.eval_windows`) at step 0, every ``eval_every``
  steps and at the end; MoE layers evaluate ``dropless`` when training uses ``capacity``, so no
  eval token is ever dropped.
* Checkpoints (orbax) every ``ckpt_every`` steps and at the end hold the model, the optimiser
  state (with its step count) and a JSON record (step, curve so far, metrics, configs, corpus
  hash). The data position is the step itself: batch ``s`` is drawn from ``(seed, s)``
  (:func:`moe_scaling.train.data.train_batch`), so a resumed run is bit-identical to a straight one.
  A checkpoint of other configs, or of a corpus whose content has changed since, is a
  :class:`ConfigError`: a run never resumes on other data. A checkpoint that does not restore
  (damaged files) is set aside and the one before it is used
  (:meth:`moe_scaling.train.checkpoints.Checkpoints.restore_newest`).
* A non-finite loss ends the run with status ``diverged`` (the step and the last good loss);
  no checkpoint of non-finite parameters is written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Any, Callable

import jax
import numpy as np

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_write_bytes, finite_or_none
from moe_scaling.model.routing import resolve_dispatch
from moe_scaling.train.checkpoints import Checkpoints, init_model_from
from moe_scaling.train.mesh import barrier, place_run
from moe_scaling.train.data import eval_windows, load_tokens, tokenizer_for, tokenizer_vocab_size, train_batch
from moe_scaling.train.tokenizers import check_vocab
from moe_scaling.train.step import init_state, lr_schedule, make_eval_step, make_train_step

__all__ = ["TrainResult", "train", "resume_and_train", "end_step_of", "compile_for", "compiled", "program_config",
           "eval_program"]



@dataclass
class TrainResult:
    """The outcome of :func:`train` (one row of a sweep's results table)."""

    status: str                    # "completed" | "diverged" | "stopped" (stop_at_step reached)
    steps: int                     # optimiser steps done in total (incl. before a resume)
    tokens: int                    # training tokens seen in total
    final_eval_loss: float | None  # mean loss on the fixed held-out eval set at the end
    best_eval_loss: float | None
    final_train_loss: float | None
    diverged_step: int | None      # step at which NaN/inf appeared
    last_good_loss: float | None
    wall_s: float                  # wall time of this call
    step_time_s: float             # time inside the jitted train steps in this call
    tokens_per_s: float            # tokens trained in this call / step_time_s
    curve: list[dict] = field(default_factory=list)
    corpus_hash: str = ""
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _nan_if_none(v) -> float:
    return float("nan") if v is None else float(v)


def _check_compatible(model_cfg: ModelConfig, data_cfg: DataConfig, train_tokens, valid_tokens):
    if data_cfg.tokenizer != "byte":  # a real tokenizer: the embedding table is exactly its vocabulary
        check_vocab(model_cfg.vocab_size, tokenizer_for(data_cfg))
    top = int(max(train_tokens.max(initial=0), valid_tokens.max(initial=0)))
    if model_cfg.vocab_size <= top:
        raise ConfigError(f"model.vocab_size = {model_cfg.vocab_size}: the corpus holds token id "
                          f"{top}; set vocab_size >= {max(top + 1, tokenizer_vocab_size(data_cfg.tokenizer))}")
    if data_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len = {data_cfg.seq_len}: longer than model.max_seq_len "
                          f"({model_cfg.max_seq_len}); shorten seq_len or raise max_seq_len")


def run_configs(model_cfg, train_cfg, data_cfg) -> dict:
    """The ``configs`` of a checkpoint's record (what ``moe-export`` rebuilds the model from).
    The mesh says where a run computes, not what: a checkpoint resumes on any mesh."""
    train = {k: v for k, v in train_cfg.to_dict().items() if k != "mesh"}
    return {"model": model_cfg.to_dict(), "train": train, "data": data_cfg.to_dict()}


# --------------------------------------------------------------------------------------
# Compiled programs, kept for the life of the process
# --------------------------------------------------------------------------------------

# Fields of TrainConfig that never enter a compiled program (the token budget enters only as the
# step count, which program keys carry separately).
_HOST_FIELDS = ("tokens", "seed", "eval_every", "eval_batches", "ckpt_every", "log_every")

_PROGRAMS: dict[tuple, Any] = {}


def program_config(train_cfg: TrainConfig, *free: str) -> TrainConfig:
    """``train_cfg`` with the fields that do not change a compiled program set to their defaults
    (the host-side fields above plus ``free``, fields a program takes as arguments): equal results
    mean the same program."""
    defaults = TrainConfig()
    return dataclasses.replace(train_cfg, **{f: getattr(defaults, f) for f in _HOST_FIELDS + free})


def compiled(key: tuple, fn: Any, *args: Any) -> Any:
    """``fn.lower(*args).compile()`` for the program named by ``key`` (a tuple of its configs, step
    count, dispatch and argument shapes), from the cheapest place that has it:

    1. this process: later runs of the same shapes in a sweep worker neither trace nor load it;
    2. when JAX's persistent compilation cache is on (``moe-sweep run``: ``OUT/jax_cache``), the
       serialized executable in ``<cache>/programs/``, found by ``key`` and
       :func:`_program_environment` without tracing the program (tracing and lowering were a third
       of a small run's fixed cost on a warm cache);
    3. else it is traced and compiled (JAX's cache still serves the compilation) and written to 2,
       unless JAX's cache served it: an XLA:CPU executable deserialized from JAX's cache and
       serialized again can lack kernels (JAX 0.10: "NOT_FOUND: Function broadcast_multiply_fusion.13
       not found" when another process runs it; reproduced with a study run's eval program), so
       only a fresh compilation is written, and JAX's cache serves the rest.
    A damaged or unreadable file in 2 is ignored and rewritten. (The files are pickles: the cache
    folder is trusted as the checkpoints beside it are.)"""
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    path = _program_path(key)
    program = None
    if path is not None and path.is_file():
        try:
            program = _load_program(path)
        except Exception:  # noqa: BLE001 - any unreadable entry is recompiled and replaced
            program = None
    if program is None:
        hits = _jax_cache_hits()
        program = fn.lower(*args).compile()
        if path is not None and _jax_cache_hits() == hits:
            try:
                _save_program(program, path)
            except Exception:  # noqa: BLE001 - a cache that cannot be written is not an error
                pass
    _PROGRAMS[key] = program
    return program


_CACHE_HITS: list[int] = []      # one counter, created with its listener on first use


def _jax_cache_hits() -> int:
    """Hits of JAX's persistent compilation cache in this process since the first call."""
    if not _CACHE_HITS:
        _CACHE_HITS.append(0)

        def count(event: str, **_: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _CACHE_HITS[0] += 1

        jax.monitoring.register_event_listener(count)
    return _CACHE_HITS[0]


@functools.cache
def _program_environment() -> str:
    """What else decides a compiled program: the JAX and jaxlib versions, the backend and its
    devices, ``XLA_FLAGS``, the JAX settings that change numerics, and the source of every module
    the programs are traced from (``moe_scaling/config.py``, ``model/``, ``train/``)."""
    import jaxlib

    root = Path(__file__).resolve().parents[1]
    source = hashlib.sha256()
    for path in sorted([root / "config.py", *(root / "model").glob("*.py"), *(root / "train").glob("*.py")]):
        source.update(path.name.encode() + b"\0" + path.read_bytes())
    devices = jax.devices()
    # "programs-2": files written before cache-served programs were left out may be broken; never read them
    return repr(("programs-2", jax.__version__, jaxlib.__version__, jax.default_backend(), devices[0].device_kind,
                 len(devices), os.environ.get("XLA_FLAGS", ""), jax.config.jax_enable_x64,
                 jax.config.jax_default_matmul_precision, source.hexdigest()))


def _program_path(key: tuple) -> Path | None:
    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        return None
    digest = hashlib.sha256(repr((key, _program_environment())).encode()).hexdigest()[:32]
    return Path(folder) / "programs" / f"{key[0]}-{digest}.pkl"


def _save_program(program: Any, path: Path) -> None:
    from jax.experimental import serialize_executable

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, pickle.dumps(serialize_executable.serialize(program)))


def _load_program(path: Path) -> Any:
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = pickle.loads(path.read_bytes())
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)


def _eval_losses(graphdef, train_cfg: TrainConfig, dispatch: str, state, inputs, targets):
    """Cross-entropy of each eval batch, ``inputs/targets [n_batches, B, S]`` -> ``[n_batches]``:
    the whole eval set in one call."""
    one = make_eval_step(graphdef, train_cfg, dispatch)
    return jax.lax.map(lambda xy: one(state, *xy), (inputs, targets))


def eval_program(graphdef, model_cfg: ModelConfig, train_cfg: TrainConfig, dispatch: str,
                 state, eval_set: list, members: int | None = None) -> Callable[[Any], np.ndarray]:
    """``losses(state)``: the per-batch eval losses of ``state`` (``[n_batches]``, or
    ``[members, n_batches]`` for a stacked state of ``members`` models), compiled once per
    process and shape."""
    xs = np.stack([x for x, _ in eval_set])
    ys = np.stack([y for _, y in eval_set])
    fn = partial(_eval_losses, graphdef, train_cfg, dispatch)
    if members is not None:
        fn = jax.vmap(fn, in_axes=(0, None, None))
    key = ("eval", model_cfg, program_config(train_cfg, "lr", "min_lr_ratio", "weight_decay"),
           dispatch, members, xs.shape)
    run = compiled(key, jax.jit(fn), state, xs, ys)
    barrier("eval-compiled")                 # every process has it before any runs it
    return lambda s: np.asarray(jax.device_get(run(s, xs, ys)))



def _resume(ckpt: Checkpoints | None, ckpt_dir: Any, state: Any, configs: dict, corpus_hash: str,
            data_cfg: DataConfig) -> tuple[Any, dict | None]:
    """Restore the newest checkpoint of ``ckpt`` that restores into ``state``: ``(state, record)``,
    or ``(state, None)`` when there is none (:meth:`Checkpoints.restore_newest`: a damaged one is
    set aside with one line on stderr). A checkpoint of other configs, or of a corpus whose
    content hash differs from ``corpus_hash``, is a :class:`ConfigError` (the manager is closed)."""
    if ckpt is None:
        return state, None
    state, record = ckpt.restore_newest(state)
    if record is None:
        return state, None
    problem = None
    if _run_identity(record.get("configs")) != _run_identity(finite_or_none(configs)):
        problem = (f"ckpt_dir = {str(ckpt_dir)!r}: holds a checkpoint of different configs; use a fresh "
                   "directory for this run")
    elif record.get("corpus_hash") and record["corpus_hash"] != corpus_hash:
        problem = (f"data.corpus = {data_cfg.corpus!r}: its content changed since this run started "
                   f"(corpus hash {record['corpus_hash'][:8]} then, {corpus_hash[:8]} now; checkpoint in "
                   f"{str(ckpt_dir)!r}); restore the original corpus files, or start a new run folder "
                   "(a new --out for moe-sweep, a new ckpt_dir for train())")
    if problem:
        ckpt.close()
        raise ConfigError(problem)
    return state, record


def _run_identity(configs: dict | None) -> dict | None:
    """``configs`` without the checkpoint interval: a run may resume with another ``ckpt_every``
    (when it is written changes nothing it computes)."""
    if not configs:
        return configs
    return {**configs, "train": {k: v for k, v in configs.get("train", {}).items() if k != "ckpt_every"}}


class _Run:
    """The mutable state of one :func:`train` call (train state, curve, eval bests, metrics,
    timings, the losses since the last curve row) and the steps that change it: evaluate, save,
    the step loop and the end of the run. The order of work is exactly that of a straight loop."""

    def __init__(self, state: Any, record: dict | None, *, train_cfg: TrainConfig, seq: int, steps: int,
                 configs: dict, corpus_hash: str, ckpt: Checkpoints | None,
                 eval_loss: Callable[[Any], float], on_log: Callable[[dict], None] | None,
                 place: Callable = lambda x, y: (x, y), events_dir: str | os.PathLike | None = None) -> None:
        self.state, self.record, self.train_cfg, self.seq, self.steps = state, record, train_cfg, seq, steps
        self.per_step = train_cfg.batch_size * seq
        self.configs, self.corpus_hash, self.ckpt = configs, corpus_hash, ckpt
        self.eval_loss, self.on_log = eval_loss, on_log
        self.place = place  # host batch -> device(s): identity on one device, the mesh's sharding
        self.start = 0 if record is None else int(record["step"])
        self.curve = [] if record is None else [
            {**row, "train_loss": _nan_if_none(row.get("train_loss")), "eval_loss": _nan_if_none(row["eval_loss"])}
            for row in record["curve"]]
        evals = [r["eval_loss"] for r in self.curve if math.isfinite(r["eval_loss"])]
        self.best_eval = min(evals) if evals else None
        self.last_eval = evals[-1] if evals else None
        self.last_good = (record or {}).get("last_good_loss")
        self.metrics: dict[str, Any] = dict((record or {}).get("metrics") or {})
        self.timings = {"compile_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0}
        self.step_time = 0.0
        # Losses of the steps since the last curve row (persisted, so a resume between rows
        # averages the same steps) and their MoE statistics (for ``metrics``).
        self.window = [float(v) for v in (record or {}).get("window_losses") or []]
        self.window_stats: list[dict] = []
        # TensorBoard scalars (moe_scaling/train/events.py) when the run has a folder for them
        self.events = None
        if events_dir is not None and self.start < steps:    # a finished run writes nothing more
            from moe_scaling.train.events import EventLog
            self.events = EventLog(events_dir, purge_step=self.start)
            self.lr = lr_schedule(train_cfg, steps)

    def evaluate(self, step: int) -> float:
        t0 = time.perf_counter()
        loss = self.eval_loss(self.state)
        self.timings["eval_s"] += time.perf_counter() - t0
        self.last_eval = loss
        if math.isfinite(loss):
            self.best_eval = loss if self.best_eval is None else min(self.best_eval, loss)
        if self.on_log is not None:
            self.on_log({"step": step, "steps": self.steps, "tokens": step * self.per_step, "eval_loss": loss})
        if self.events is not None:
            self.events.scalars(step, {"eval/loss": loss})
        return loss

    def save(self, step: int, status: str) -> None:
        if self.ckpt is None:
            return
        t0 = time.perf_counter()
        self.ckpt.save(step, self.state, {"step": step, "status": status, "configs": self.configs,
                                          "corpus_hash": self.corpus_hash, "curve": self.curve,
                                          "last_good_loss": self.last_good, "window_losses": self.window,
                                          "metrics": self.metrics})
        self.timings["ckpt_s"] += time.perf_counter() - t0

    def run_steps(self, train_step: Callable[..., Any], batch_at: Callable[[int], tuple], end_step: int,
                  progress: bool) -> tuple[str, int | None]:
        """Train from ``start`` to ``end_step``: ``(status, diverged_step)``. ``train_step(state,
        x, y)`` gives the compiled step (called once, its time is ``compile_s``); ``batch_at(s)``
        is the host batch ``(x, y)`` of step ``s``, a function of the step alone (exact resume)."""
        cfg = self.train_cfg
        if self.start >= end_step:
            return "completed", None
        x, y = self.place(*batch_at(self.start))
        t0 = time.perf_counter()
        step_fn = train_step(self.state, x, y)
        self.timings["compile_s"] += time.perf_counter() - t0
        barrier("step-compiled")                 # every process has it before any runs it
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=end_step, initial=self.start, desc="train", unit="step", dynamic_ncols=True)
        status, diverged_step = "completed", None
        for s in range(self.start, end_step):
            t0 = time.perf_counter()
            self.state, m = step_fn(self.state, x, y)
            if s + 1 < end_step:  # prepare the next batch while the step runs
                x, y = self.place(*batch_at(s + 1))
            m = jax.device_get(m)
            self.step_time += time.perf_counter() - t0
            step = s + 1
            loss = float(m["loss"])
            if not (math.isfinite(loss) and math.isfinite(float(m["total_loss"]))):
                status, diverged_step = "diverged", self.diverge(step, loss)
                break
            self._logged(step, loss, m, bar)
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0 and step < end_step:
                self.save(step, "running")
        if bar is not None:
            bar.close()
        return status, diverged_step

    def diverge(self, step: int, loss: float) -> int:
        """Record the non-finite loss of ``step`` as the curve's last row; returns ``step``."""
        self.curve.append({"step": step, "tokens": step * self.per_step, "train_loss": loss,
                           "eval_loss": float("nan")})
        return step

    def _logged(self, step: int, loss: float, m: dict, bar: Any) -> None:
        """Add a finite step's loss to the window; on a log or eval step, write the curve row."""
        self.last_good = loss
        self.window.append(loss)
        self.window_stats.append(m)
        eval_now = step % self.train_cfg.eval_every == 0 or step == self.steps
        if not (step % self.train_cfg.log_every == 0 or eval_now):
            return
        train_loss = float(np.mean(self.window))
        window = _window_metrics(self.window_stats) if self.window_stats else {}
        self.metrics.update(window)
        self.window, self.window_stats = [], []
        tps = (step - self.start) * self.per_step / max(self.step_time, 1e-9)
        if self.events is not None:
            from moe_scaling.train.events import train_scalars
            self.events.scalars(step, train_scalars(train_loss, float(self.lr(step - 1)), tps, window))
        row = {"step": step, "tokens": step * self.per_step, "train_loss": train_loss,
               "eval_loss": self.evaluate(step) if eval_now else float("nan")}
        self.curve.append(row)
        if self.on_log is not None:
            self.on_log({"step": step, "steps": self.steps, "tokens": step * self.per_step,
                         "train_loss": train_loss, "tokens_per_s": tps,
                         "aux_loss": self.metrics.get("aux_loss"),
                         "dropped_fraction": self.metrics.get("dropped_fraction")})
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)

    def finish(self, status: str, diverged_step: int | None, end_step: int, t_call: float) -> TrainResult:
        """Final status, the last checkpoint, and the result."""
        if status == "diverged":
            done = diverged_step
        else:
            done = max(self.start, end_step)
            if done < self.steps:
                status = "stopped"
            elif done == self.start and self.record is not None:
                status = self.record.get("status", status)
            if done > self.start:
                self.save(done, status)
        if self.ckpt is not None:
            self.ckpt.close()
        if self.events is not None:
            self.events.close()
        trained = (done - self.start) * self.per_step
        train_rows = [r["train_loss"] for r in self.curve if math.isfinite(r["train_loss"])]
        self.metrics.update(self.timings)
        return TrainResult(
            status=status, steps=done, tokens=done * self.per_step,
            final_eval_loss=self.last_eval, best_eval_loss=self.best_eval,
            final_train_loss=train_rows[-1] if train_rows else None,
            diverged_step=diverged_step, last_good_loss=self.last_good,
            wall_s=time.perf_counter() - t_call, step_time_s=self.step_time,
            tokens_per_s=trained / self.step_time if self.step_time > 0 else 0.0,
            curve=self.curve, corpus_hash=self.corpus_hash, metrics=self.metrics)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, *,
          ckpt_dir: str | os.PathLike | None = None,
          progress: bool = True,
          on_log: Callable[[dict], None] | None = None,
          stop_at_step: int | None = None,
          mesh: str | None = None,
          init_from: str | os.PathLike | None = None,
          events_dir: str | os.PathLike | None = None,
          ) -> TrainResult:
    """Train ``model_cfg`` on ``data_cfg`` for ``train_cfg.tokens`` tokens.

    Args:
      ckpt_dir: orbax checkpoints every ``train_cfg.ckpt_every`` steps and at the end; when it
        already holds a checkpoint of the same configs and corpus content, training resumes from
        it bit-exactly (a finished run returns its recorded result without training). A
        checkpoint of other configs, or of a corpus whose files changed since, raises
        :class:`ConfigError`.
      progress: show a tqdm bar (step, loss, tokens/s, ETA) on stderr.
      on_log: called every ``log_every`` steps with ``{"step", "steps", "tokens", "train_loss",
        "tokens_per_s", "aux_loss", "dropped_fraction"}`` and after every eval with
        ``{"step", "steps", "tokens", "eval_loss"}``.
      stop_at_step: stop (status ``stopped``, checkpoint written) once this many steps are done,
        as if interrupted; the schedule still follows the full budget.
      mesh: ``data=D,fsdp=F,expert=X`` (default ``train_cfg.mesh``): train on a device mesh
        (:mod:`moe_scaling.train.mesh`); ``None`` is one device, the step of a plain ``jax.jit``.
      init_from: a checkpoint folder of another run (the previous stage of a recipe) whose final
        model weights replace the fresh initialisation; the optimiser starts fresh. Ignored when
        ``ckpt_dir`` holds a checkpoint of this run (it resumes from that).
      events_dir: write TensorBoard event files there (:mod:`moe_scaling.train.events`): train and
        eval loss, learning rate, tokens/s, gradient norm, expert load and dropped tokens.

    Returns:
      A :class:`TrainResult`; a NaN/inf loss gives status ``diverged`` (never an exception).
    """
    t_call = time.perf_counter()
    train_tokens, valid_tokens, corpus_hash = load_tokens(data_cfg)
    _check_compatible(model_cfg, data_cfg, train_tokens, valid_tokens)
    seq, batch = data_cfg.seq_len, train_cfg.batch_size
    steps = train_cfg.steps(seq)
    dispatch = resolve_dispatch(train_cfg.dispatch)
    eval_dispatch = "dropless" if dispatch == "capacity" else dispatch
    configs = run_configs(model_cfg, train_cfg, data_cfg)

    graphdef, state = init_state(model_cfg, train_cfg, steps)
    if init_from is not None:
        state = init_model_from(state, init_from)
    placement = place_run(mesh or train_cfg.mesh, model_cfg, batch, state)
    if placement is not None:
        state = placement.put_state(state)
    place = placement.put_batch if placement is not None else (lambda x, y: (x, y))
    eval_set = [place(x, y) for x, y in eval_windows(valid_tokens, batch, seq, train_cfg.eval_batches)]
    t0 = time.perf_counter()
    if placement is None:
        losses = eval_program(graphdef, model_cfg, train_cfg, eval_dispatch, state, eval_set)
        eval_loss = lambda s: float(np.mean(losses(s), dtype=np.float64))  # noqa: E731
        key = ("train", model_cfg, program_config(train_cfg), steps, dispatch, (batch, seq))
        train_step = partial(compiled, key, make_train_step(graphdef, train_cfg, dispatch))
    else:  # on a mesh the programs depend on the device layout: compiled for this run, not kept
        eval_step = make_eval_step(graphdef, train_cfg, eval_dispatch, placement)
        eval_loss = lambda s: float(np.mean([float(eval_step(s, x, y)) for x, y in eval_set]))  # noqa: E731
        train_step = compile_for(make_train_step(graphdef, train_cfg, dispatch, placement))
    result, _ = resume_and_train(
        state, ckpt_dir=ckpt_dir, configs=configs, corpus_hash=corpus_hash, data_cfg=data_cfg,
        train_cfg=train_cfg, steps=steps, stop_at_step=stop_at_step, train_step=train_step,
        batch_at=lambda s: train_batch(train_tokens, batch, seq, train_cfg.seed, s), eval_loss=eval_loss,
        on_log=on_log, progress=progress, place=place, t_call=t_call, compile_s=time.perf_counter() - t0,
        metrics={"dispatch": dispatch, "eval_dispatch": eval_dispatch}, events_dir=events_dir)
    return result


def end_step_of(steps: int, stop_at_step: int | None) -> int:
    """The step a call trains to: ``steps``, or ``stop_at_step`` clipped to ``[0, steps]``."""
    return steps if stop_at_step is None else max(0, min(steps, int(stop_at_step)))


def compile_for(jitted: Any) -> Callable[..., Any]:
    """The ``train_step`` argument of :func:`resume_and_train` for a jitted step compiled for
    this run only (not kept in the process or on disk as :func:`compiled` does)."""
    return lambda *args: jitted.lower(*args).compile()


def resume_and_train(state: Any, *, ckpt_dir: str | os.PathLike | None, configs: dict, corpus_hash: str,
                     data_cfg: DataConfig, train_cfg: TrainConfig, steps: int, stop_at_step: int | None,
                     train_step: Callable[..., Any], batch_at: Callable[[int], tuple],
                     eval_loss: Callable[[Any], float], on_log: Callable[[dict], None] | None = None,
                     progress: bool = False, place: Callable = lambda x, y: (x, y), t_call: float | None = None,
                     compile_s: float = 0.0, metrics: dict | None = None,
                     events_dir: str | os.PathLike | None = None) -> tuple[TrainResult, Any]:
    """What every training stage does once its state and programs exist (pre-/mid-training through
    :func:`train`, instruction tuning and QAT directly): resume from the newest checkpoint in
    ``ckpt_dir`` that restores (a finished run returns its record), evaluate step 0 on a fresh
    start, train to ``steps`` (or ``stop_at_step``: status ``stopped``) with a checkpoint every
    ``ckpt_every`` steps, and write the last one. ``train_step(state, x, y)`` gives the compiled
    step, ``batch_at(s)`` step ``s``'s host batch, ``eval_loss(state)`` the held-out loss;
    ``metrics`` are added to the run's; ``events_dir`` gets TensorBoard event files
    (:mod:`moe_scaling.train.events`). Returns ``(result, final state)``."""
    t_call = time.perf_counter() if t_call is None else t_call
    end_step = end_step_of(steps, stop_at_step)
    ckpt = Checkpoints(ckpt_dir) if ckpt_dir is not None else None
    state, record = _resume(ckpt, ckpt_dir, state, configs, corpus_hash, data_cfg)
    run = _Run(state, record, train_cfg=train_cfg, seq=data_cfg.seq_len, steps=steps, configs=configs,
               corpus_hash=corpus_hash, ckpt=ckpt, eval_loss=eval_loss, on_log=on_log, place=place,
               events_dir=events_dir)
    run.metrics.update(metrics or {})
    run.timings["compile_s"] += compile_s
    if run.start == 0 and not run.curve:
        run.curve.append({"step": 0, "tokens": 0, "train_loss": float("nan"), "eval_loss": run.evaluate(0)})
    status, diverged_step = run.run_steps(train_step, batch_at, end_step, progress)
    return run.finish(status, diverged_step, end_step, t_call), run.state


def _window_metrics(window: list[dict]) -> dict[str, Any]:
    """MoE metrics averaged over the steps of a logging window."""
    load = np.mean([w["expert_load"] for w in window], axis=0)  # [n_moe_layers, E]
    out = {name: float(np.mean([w[name] for w in window]))
           for name in ("aux_loss", "z_loss", "dropped_fraction", "grad_norm")}
    if load.size and load.shape[0]:
        out["expert_load"] = [float(v) for v in load.mean(axis=0)]
        out["expert_load_per_layer"] = [[float(v) for v in row] for row in load]
        out["load_imbalance"] = float(load.max(axis=1).mean() * load.shape[1])
    return out
