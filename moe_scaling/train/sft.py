"""Stage 3: instruction fine-tuning on chat-format JSONL, the loss on assistant tokens only.

**Data.** One example per line: ``{"messages": [{"role": "system" | "user" | "assistant",
"content": "..."}, ...]}`` with at least one assistant message (users bring their data; the tests'
fixture is ``tests/data/chat.jsonl``). A bad line is a one-line :class:`ConfigError` naming the file,
the line and the fix.

**Rendering.** Each message becomes the text ``<|{role}|>\\n{content}<|end|>\\n``, tokenized piece by
piece (header, content, end marker) so that the loss mask falls exactly on piece boundaries for any
tokenizer (byte, ``bpe:N``, ``tokenizer.json``); examples are separated by the tokenizer's
end-of-text id when it has one.

**Loss mask.** Writing the stream as ids ``x_0 .. x_n`` and ``m_i = 1`` when ``x_i`` is part of an
assistant message's content or its closing ``<|end|>\\n`` (so the model learns to stop), the target
``x_{t+1}`` of position ``t`` is trained iff ``m_{t+1} = 1``; every other target is stored as ``-1``,
and the stage minimises (:func:`moe_scaling.train.step.loss_fn` with ``masked=True``)::

    L = sum_{t: m_{t+1} = 1} -log p(x_{t+1} | x_{<=t}) / #{t: m_{t+1} = 1}

**Packing.** The examples' streams are concatenated in file order and cut into rows of
``seq_len + 1`` ids with stride ``seq_len`` (inputs = the first ``seq_len``, targets = the last);
the tail is padded with untrained targets. An example may span two rows and attention is not reset
at example boundaries (plain packing: each target still sees only its own past).

**Split.** The last ``data.valid_fraction`` of the examples (at least one) is the held-out set; the
eval loss is the masked loss over all its rows, weighted by trained targets. Training rows are drawn
with replacement from a generator seeded by ``(seed, step)``.

:func:`sft` continues a trained model (a :class:`Transformer`, its state or a ``train()``
checkpoint folder) with a fresh AdamW (the stage's own schedule) and returns the trainer's
:class:`~moe_scaling.train.loop.TrainResult` (the curve, checkpoints, resume and divergence of
pre-training, :func:`moe_scaling.train.loop.resume_and_train`); with ``ckpt_dir`` it checkpoints
there every ``ckpt_every`` steps and at the end (the next stage starts from the last one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flax import nnx

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.routing import resolve_dispatch
from moe_scaling.train.data import corpus_content_hash
from moe_scaling.train.loop import TrainResult, compile_for, resume_and_train, run_configs
from moe_scaling.train.qat import initial_model
from moe_scaling.train.step import make_eval_step, make_optimizer, make_train_step

__all__ = ["ROLES", "load_chat", "render", "pack", "chat_rows", "sft"]

ROLES = ("system", "user", "assistant")
IGNORE = -1


def load_chat(path: str | Path) -> list[list[dict[str, str]]]:
    """The examples of a chat JSONL file (see the module docstring); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.corpus = {str(path)!r}: no such chat file; give a .jsonl of "
                          '{"messages": [{"role": ..., "content": ...}]} lines')
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not JSON ({err.msg}); one JSON object per line") from None
        msgs = doc.get("messages") if isinstance(doc, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f'{where}: needs a non-empty "messages" list of {{"role", "content"}} objects')
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: message {m!r:.80}: role must be one of {', '.join(ROLES)} "
                                  "and content a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ConfigError(f"{where}: no assistant message, so nothing to train on; add one or drop the line")
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise ConfigError(f"data.corpus = {str(path)!r}: no examples")
    return out


def render(messages: list[dict[str, str]], encode: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, m)`` of one example: the template's ids and the 0/1 assistant mask (module docstring)."""
    ids, mask = [], []
    for m in messages:
        on = int(m["role"] == "assistant")
        for text, trained in ((f"<|{m['role']}|>\n", 0), (m["content"], on), ("<|end|>\n", on)):
            piece = np.asarray(encode(text), np.int64)
            ids.append(piece)
            mask.append(np.full(piece.size, trained, np.int8))
    return np.concatenate(ids), np.concatenate(mask)


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int,
         eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``inputs, targets [rows, seq_len]`` (int32; untrained targets ``-1``) of rendered examples."""
    ids, mask = [], []
    for k, (x, m) in enumerate(examples):
        if k and eos is not None:
            ids.append(np.array([eos], np.int64))
            mask.append(np.zeros(1, np.int8))
        ids.append(x)
        mask.append(m)
    ids, mask = np.concatenate(ids), np.concatenate(mask)
    rows = max(1, -(-(ids.size - 1) // seq_len))
    n = rows * seq_len + 1
    ids = np.pad(ids, (0, n - ids.size))
    mask = np.pad(mask, (0, n - mask.size))
    target = np.where(mask[1:] == 1, ids[1:], IGNORE)
    return (ids[:-1].reshape(rows, seq_len).astype(np.int32), target.reshape(rows, seq_len).astype(np.int32))


def chat_rows(data_cfg: DataConfig) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(train_inputs, train_targets), (valid_inputs, valid_targets)`` of ``data_cfg.corpus``."""
    from moe_scaling.train.data import tokenizer_for

    examples = load_chat(data_cfg.corpus)
    if len(examples) < 2:
        raise ConfigError(f"data.corpus = {data_cfg.corpus!r}: {len(examples)} example; at least 2 (one held out)")
    tok = tokenizer_for(data_cfg)
    encode = lambda text: tok.encode_documents([text.encode("utf-8")])  # noqa: E731
    n_valid = min(len(examples) - 1, max(1, round(data_cfg.valid_fraction * len(examples))))
    rendered = [render(m, encode) for m in examples]
    return (pack(rendered[:-n_valid], data_cfg.seq_len, tok.eos),
            pack(rendered[-n_valid:], data_cfg.seq_len, tok.eos))


def sft(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, init: Any, *,
        ckpt_dir: str | Path | None = None, on_log: Callable[[dict], None] | None = None,
        stop_at_step: int | None = None, events_dir: str | Path | None = None) -> TrainResult:
    """Instruction fine-tuning of ``init`` for ``train_cfg.tokens`` tokens (``steps`` = tokens /
    (batch x seq_len), as pre-training counts them) on the chat file ``data_cfg.corpus``. With
    ``ckpt_dir`` it checkpoints every ``ckpt_every`` steps and resumes from there bit-exactly
    (:func:`moe_scaling.train.loop.resume_and_train`, as pre-training does); ``stop_at_step`` stops
    early as if interrupted. A non-finite loss ends it with status ``diverged``. ``events_dir``:
    TensorBoard scalars like pre-training's (:mod:`moe_scaling.train.events`)."""
    t0 = time.perf_counter()
    (x_train, y_train), (x_valid, y_valid) = chat_rows(data_cfg)
    model = initial_model(model_cfg, train_cfg, data_cfg, init)
    steps, batch = train_cfg.steps(data_cfg.seq_len), train_cfg.batch_size
    opt = nnx.Optimizer(model, make_optimizer(train_cfg, steps), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    step = make_train_step(graphdef, train_cfg, resolve_dispatch(train_cfg.dispatch), masked=True)
    evaluate = make_eval_step(graphdef, train_cfg, "dropless", masked=True)
    reps = -(-batch // len(x_valid))
    xv, yv = np.tile(x_valid, (reps, 1)), np.tile(y_valid, (reps, 1))       # whole batches only
    chunks = [(xv[i:i + batch], yv[i:i + batch]) for i in range(0, len(xv) - batch + 1, batch)]
    weights = np.array([(y >= 0).sum() for _, y in chunks], float)

    def eval_loss(state) -> float:
        losses = np.array([float(evaluate(state, x, y)) for x, y in chunks])
        return float(np.sum(losses * weights) / max(weights.sum(), 1.0))

    def batch_at(s: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.random.default_rng([train_cfg.seed, s]).integers(0, len(x_train), batch)
        return x_train[rows], y_train[rows]

    result, _ = resume_and_train(
        state, ckpt_dir=ckpt_dir, configs=run_configs(model_cfg, train_cfg, data_cfg),
        corpus_hash=corpus_content_hash(data_cfg.corpus), data_cfg=data_cfg, train_cfg=train_cfg, steps=steps,
        stop_at_step=stop_at_step, train_step=compile_for(step), batch_at=batch_at, eval_loss=eval_loss,
        on_log=on_log, t_call=t0, events_dir=events_dir,
        metrics={"trained_targets_per_row": float((y_train >= 0).mean() * data_cfg.seq_len)})
    return result
