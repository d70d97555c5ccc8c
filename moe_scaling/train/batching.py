"""Which runs train together (seed batching, :mod:`moe_scaling.train.group`) and how many at once.

Kept apart from the group trainer so that the sweep's planning (``moe-sweep validate``, the
queue's claims) needs no JAX.

* :func:`batch_key`: runs with equal keys differ only in :data:`BATCHED_FIELDS` and can be one
  vmapped program.
* :func:`group_size`: how many of them one worker trains together: a simple memory estimate
  (:func:`member_bytes`) against :data:`MEMORY_FRACTION` of the available memory, at most
  :data:`MAX_MEMBERS`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.costs import param_counts

__all__ = ["BATCHED_FIELDS", "MAX_MEMBERS", "MEMORY_FRACTION", "batch_key", "member_bytes",
           "available_memory", "group_size"]

BATCHED_FIELDS = ("seed", "lr", "min_lr_ratio", "weight_decay")
MAX_MEMBERS = 16                # more members rarely gain more throughput and make a crash cost more
MEMORY_FRACTION = 0.5           # of the available memory, shared by a machine's local workers


def batch_key(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> str:
    """Runs with equal keys can train together: their configs are equal except for
    :data:`BATCHED_FIELDS`."""
    train = {k: v for k, v in train_cfg.to_dict().items() if k not in BATCHED_FIELDS}
    return json.dumps({"model": model_cfg.to_dict(), "train": train, "data": data_cfg.to_dict()},
                      sort_keys=True)


def member_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> int:
    """A rough upper estimate of the memory one member adds to a group's train step, in bytes:
    twice (XLA temporaries, the masked copy of the state) the float32 train state (parameters,
    gradients, two AdamW moments: 16 bytes per parameter) plus the activations kept for the
    backward pass: per token and layer ``12 d_model`` (norms, q/k/v, attention output, residuals),
    the FFN (``3 d_ff`` dense; MoE ``capacity_factor * top_k * (3 d_expert + 2 d_model)`` plus
    ``3 d_shared`` per shared expert) and ``2 n_heads seq_len`` attention scores and
    probabilities, plus ``3 vocab_size`` for the logits."""
    m = model_cfg
    if m.is_moe:
        ffn = (train_cfg.capacity_factor * m.top_k * (3 * m.d_expert + 2 * m.d_model)
               + 3 * m.n_shared * m.d_shared)
    else:
        ffn = 3 * m.d_ff
    per_token = m.n_layers * (12 * m.d_model + ffn + 2 * m.n_heads * data_cfg.seq_len) + 3 * m.vocab_size
    activations = 4 * train_cfg.batch_size * data_cfg.seq_len * per_token
    return int(2 * (16 * param_counts(m).total + activations))


def available_memory() -> int:
    """Bytes of memory available to new work: ``MemAvailable`` of ``/proc/meminfo``, else the
    physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def group_size(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, *,
               workers: int = 1, available: int | None = None) -> int:
    """How many members of this shape one worker trains together: as many as fit in
    :data:`MEMORY_FRACTION` of the available memory split over ``workers`` local workers, by
    :func:`member_bytes`, between 1 and :data:`MAX_MEMBERS`."""
    budget = MEMORY_FRACTION * (available_memory() if available is None else available) / max(workers, 1)
    return max(1, min(MAX_MEMBERS, int(budget // member_bytes(model_cfg, train_cfg, data_cfg))))
