"""TensorBoard event files of a run, written with TensorBoard's own ``EventFileWriter``.

Every sweep run writes into its run folder (``OUT/runs/<run_id>/``) and every ``moe-train`` stage
into its stage folder (``OUT/stages/<stage>/``), so ``tensorboard --logdir OUT`` lists a sweep's
runs (or a recipe's stages) side by side. The scalars, by tag:

    train/loss                 cross-entropy, mean over the steps since the last row (as the curve)
    train/lr                   the learning rate of the row's last step
    train/tokens_per_s         training tokens per second of step time so far
    train/grad_norm            global gradient norm (mean over the window)
    train/aux_loss             load-balance loss (MoE)
    eval/loss                  held-out loss (int4 fake-quantized in the QAT stage)
    moe/dropped_fraction       share of routed token slots over capacity (MoE)
    moe/load_max_over_mean/layer_<i>   expert load max / mean of MoE layer i (1 = balanced)

A resumed run starts its events with a ``SessionLog.START`` at the step it resumes from, so
TensorBoard drops the events an interrupted attempt wrote after its last checkpoint.

TensorBoard's writer is used rather than tensorboardX because tensorboardX imports torch whenever it
is installed (1.6 s per process with the ``hf`` extra, in every sweep worker).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

__all__ = ["EventLog", "train_scalars"]


class EventLog:
    """Scalars of one run into ``log_dir`` (created); ``purge_step``: the step a resumed run
    continues from (events of an earlier attempt at or after it are discarded by TensorBoard)."""

    def __init__(self, log_dir: str | os.PathLike, *, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(log_dir, exist_ok=True)
        self._writer = EventFileWriter(str(log_dir), flush_secs=30)
        if purge_step:
            self._writer.add_event(event_pb2.Event(
                step=int(purge_step), session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One event at ``step`` with every value that is a number (None is left out)."""
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
            for tag, v in values.items() if v is not None])
        if summary.value:
            self._writer.add_event(self._event_pb2.Event(step=int(step), summary=summary))

    def close(self) -> None:
        self._writer.close()


def train_scalars(train_loss: float, lr: float, tokens_per_s: float,
                  metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The ``train/*`` and ``moe/*`` scalars of one logged row; ``metrics``: the logging window's
    (``loop._window_metrics``: grad_norm, aux_loss, dropped_fraction, expert_load_per_layer)."""
    out: dict[str, float | None] = {"train/loss": train_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                                    "train/grad_norm": metrics.get("grad_norm")}
    per_layer = metrics.get("expert_load_per_layer") or []
    if per_layer:
        out["train/aux_loss"] = metrics.get("aux_loss")
        out["moe/dropped_fraction"] = metrics.get("dropped_fraction")
        for i, row in enumerate(per_layer):
            mean = sum(row) / len(row)
            out[f"moe/load_max_over_mean/layer_{i}"] = max(row) / mean if mean > 0 else math.nan
    return out
