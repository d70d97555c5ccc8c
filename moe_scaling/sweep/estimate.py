"""How long a sweep will take, before it runs (``moe-sweep validate``), with seed batching.

A cost model, not a measurement: one worker on the project's 2-core CPU machine (float32).

* One train step of a run: :func:`step_seconds`, ``c0 + c1 * GFLOP trained per step + c2 * G
  routed values per step + c3 * (MoE layers x experts) / 100``: the per-step time of the 60 runs of
  ``results/sparsity_granularity`` (committed) fitted by least squares (mean error 10%, the sum of
  all 60 within 1%). GFLOP trained = 3 x forward FLOPs per token x tokens per step; routed values =
  MoE layers x tokens x top_k x capacity_factor x d_model.
* A run: its steps x step time plus :data:`FIXED_S` (compilation, evals, checkpoints, start-up:
  the mean over the same 60 runs).
* A group of N runs trained together (:mod:`moe_scaling.train.group`): the step time of one run x
  ``1 + MEMBER_STEP x (N - 1)`` and the fixed cost x ``1 + MEMBER_FIXED x (N - 1)`` (one compile
  and one vmapped eval per step for all; one checkpoint per member), from bench/seed_batching.json
  (3 seeds of the smallest model, dense and 64 experts top-8, 200 steps each, two alternating
  rounds, medians; measured 2026-12-01 on the quiet machine): the group's steps took 0.92x (dense)
  and 0.98x (MoE) the solo runs' steps, its fixed cost 0.93x and 0.95x theirs. On 2 CPU cores a
  step of these models is compute, not dispatch, so a group saves little.

Groups are formed as the workers form them: runs with equal
:func:`moe_scaling.train.batching.batch_key`, in grid order, at most
:func:`moe_scaling.train.batching.group_size` (this machine's memory) at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

from moe_scaling.costs import flops_per_token
from moe_scaling.sweep.grid import RunSpec
from moe_scaling.train.batching import batch_key, group_size

__all__ = ["STEP_FIT", "FIXED_S", "MEMBER_STEP", "MEMBER_FIXED", "step_seconds", "groups",
           "estimate_sweep"]

STEP_FIT = (0.01364, 0.00497, 2.7395, 0.00466)   # s, s per GFLOP, s per G routed values, s per 100 expert-layers
FIXED_S = 6.6           # s per run outside the train steps (results/sparsity_granularity, mean of 60)
MEMBER_STEP = 0.92      # step time added by each further member of a group, as a fraction of one run's
MEMBER_FIXED = 0.9      # fixed cost added by each further member


def step_seconds(run: RunSpec) -> float:
    """Estimated seconds of one train step of ``run`` trained alone (see the module docstring)."""
    m, tokens = run.model, run.train.batch_size * run.data.seq_len
    gflop = 3 * flops_per_token(m, context=run.data.seq_len) * tokens / 1e9
    moe_layers = max(m.n_layers - m.n_dense_layers, 0) if m.is_moe else 0
    routed = moe_layers * tokens * m.top_k * run.train.capacity_factor * m.d_model / 1e9
    c0, c1, c2, c3 = STEP_FIT
    return c0 + c1 * gflop + c2 * routed + c3 * moe_layers * m.n_experts / 100


def groups(runs: Sequence[RunSpec], *, batch: bool = True, workers: int = 1) -> list[list[RunSpec]]:
    """The runs as the workers group them (each run alone without ``batch``)."""
    if not batch:
        return [[r] for r in runs]
    by_key: dict[str, list[list[RunSpec]]] = {}
    out: list[list[RunSpec]] = []
    for r in runs:
        chunks = by_key.setdefault(batch_key(r.model, r.train, r.data), [])
        if not chunks or len(chunks[-1]) >= group_size(r.model, r.train, r.data, workers=workers):
            chunks.append([])
            out.append(chunks[-1])
        chunks[-1].append(r)
    return out


def _group_seconds(group: Sequence[RunSpec]) -> float:
    first, extra = group[0], len(group) - 1
    steps = first.train.steps(first.data.seq_len)
    return (steps * step_seconds(first) * (1 + MEMBER_STEP * extra)
            + FIXED_S * (1 + MEMBER_FIXED * extra))


def estimate_sweep(runs: Sequence[RunSpec], *, workers: int = 1) -> dict[str, Any]:
    """``{"batched_s", "sequential_s", "groups", "largest_group"}``: the estimated wall time of the
    sweep with one worker, batched (the default) and one by one (``--no-batch``)."""
    batched = groups(runs, workers=workers)
    return {"batched_s": sum(_group_seconds(g) for g in batched),
            "sequential_s": sum(_group_seconds([r]) for r in runs),
            "groups": len(batched), "largest_group": max(len(g) for g in batched)}
