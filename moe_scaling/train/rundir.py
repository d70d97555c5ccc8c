"""The folder of one training run: :class:`RunDir` owns the name of every file in it.

A sweep keeps one such folder per run (``DIR/runs/<run_id>/``, see
:class:`moe_scaling.sweep.layout.SweepDir`); :func:`moe_scaling.hf.export.export_checkpoint` reads
one back. Layout of a run folder ``RUN``::

    RUN/config.yaml   the resolved model/train/data config of the run
    RUN/record.json   status and results of the run (written atomically)
    RUN/curve.json    its loss curve from step 0 (written when the run ends)
    RUN/error.txt     the traceback of an exception that ended the run
    RUN/ckpt/         orbax checkpoints (train(..., ckpt_dir=RUN/ckpt)); a resumed run continues here
    RUN/ckpt/damaged/ checkpoints that did not restore, set aside (Checkpoints.restore_newest)
    RUN/events.out.tfevents.*   TensorBoard scalars (train(..., events_dir=RUN); train/events.py), so
                      ``tensorboard --logdir`` on the folder above names each run by its folder

A bare ``ckpt_dir`` given to :func:`moe_scaling.train.loop.train` is a checkpoint folder without
the rest; :attr:`RunDir.checkpoints` finds the checkpoints in either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run's folder (nothing is created or read here)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def record(self) -> Path:
        return self.path / "record.json"

    @property
    def curve(self) -> Path:
        return self.path / "curve.json"

    @property
    def error(self) -> Path:
        return self.path / "error.txt"

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    @property
    def events(self) -> Path:
        """Where the run's TensorBoard event files go: the run folder itself."""
        return self.path

    @property
    def event_files(self) -> list[Path]:
        """The TensorBoard event files written so far (oldest first)."""
        return sorted(self.events.glob("events.out.tfevents.*"))

    @property
    def checkpoints(self) -> Path:
        """The orbax folder: ``RUN/ckpt`` when it exists (a sweep's run), else the folder itself
        (a ``ckpt_dir`` given to train())."""
        return self.ckpt if self.ckpt.is_dir() else self.path
