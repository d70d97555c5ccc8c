"""The sweep folder: :class:`SweepDir` owns the name of every file and folder in it.

Layout of a sweep folder ``DIR`` (the ``--out`` of ``moe-sweep run``)::

    DIR/sweep.json                 manifest: sweep name, grid file (relative to DIR), storage URL (no
                                   password; null: the default DIR/sweep.db), run ids in grid order
                                   (runs of earlier grids of the same name first)
    DIR/grid.yaml                  a copy of the grid file of the last ``run``
    DIR/sweep.db                   the default work queue (``sqlite:///DIR/sweep.db``; absent with --storage)
    DIR/runs.parquet               one row per run with a record (see moe_scaling.sweep.results.run_row)
    DIR/curves.parquet             long table: run_id, step, tokens, train_loss, eval_loss
    DIR/.tables.lock               the fcntl lock held while the two tables are rebuilt
    DIR/.claim.lock                the fcntl lock local workers take to claim runs (whole seed groups)
    DIR/jax_cache/                 JAX's persistent compilation cache, shared by the workers
    DIR/jax_cache/programs/        compiled train/eval programs, serialized (moe_scaling.train.loop)
    DIR/progress/<host>-<pid>-<start>.json
                                   what each worker is doing now (run, step, loss, tokens/s), one
                                   file per worker process, so several ``run`` commands share DIR
    DIR/plots/                     the figures of ``moe-sweep plot`` (default folder)
    DIR/runs/<run_id>/             one run's folder (moe_scaling.train.rundir.RunDir):
        config.yaml                the resolved model/train/data config of the run
        record.json                status and results (written atomically; the source of truth)
        curve.json                 its loss curve from step 0 (written when the run ends)
        error.txt                  the traceback of an exception that ended the run
        ckpt/                      orbax checkpoints (a resumed run continues from here)
        events.out.tfevents.*      TensorBoard scalars (tensorboard --logdir DIR shows every run)

The record files are the source of truth; the two parquet tables are rebuilt from all of them
(:func:`moe_scaling.sweep.results.rebuild_tables`) whenever a run ends and when the sweep ends, so
a run in flight shows in the tables only as what its last attempt left; ``moe-sweep status``
reads the records. A folder that travels without ``runs/`` (committed to git: the tables, manifest
and grid copy) gets its records back from the tables when a sweep runs there again
(:func:`moe_scaling.sweep.results.restore_records`), so its rows stay and its finished runs are not
trained again (to train a finished run again, delete its row from the tables as well as its folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from moe_scaling.train.rundir import RunDir

__all__ = ["SweepDir"]


@dataclass(frozen=True)
class SweepDir:
    """Paths inside one sweep folder (nothing is created or read here)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def manifest(self) -> Path:
        return self.path / "sweep.json"

    @property
    def grid(self) -> Path:
        return self.path / "grid.yaml"

    @property
    def database(self) -> Path:
        return self.path / "sweep.db"

    @property
    def default_storage(self) -> str:
        """The default optuna storage URL: ``sqlite:///<absolute DIR>/sweep.db``."""
        return f"sqlite:///{self.path.resolve() / 'sweep.db'}"

    @property
    def runs_table(self) -> Path:
        return self.path / "runs.parquet"

    @property
    def curves_table(self) -> Path:
        return self.path / "curves.parquet"

    @property
    def tables_lock(self) -> Path:
        return self.path / ".tables.lock"

    @property
    def claim_lock(self) -> Path:
        return self.path / ".claim.lock"

    @property
    def jax_cache(self) -> Path:
        return self.path / "jax_cache"

    @property
    def progress(self) -> Path:
        return self.path / "progress"

    def progress_file(self, who: Mapping[str, Any]) -> Path:
        """Worker ``who``'s progress file (``who``: :func:`moe_scaling.sweep.liveness.identity`),
        named by its machine and process: a number per command (``0.json``) was written by the
        workers of every command on the folder at once, and each command's start deleted the others'."""
        return self.progress / f"{who['host'].split('/')[0]}-{who['pid']}-{who['start']}.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    def run(self, run_id: str) -> RunDir:
        """The folder of run ``run_id``."""
        return RunDir(self.runs / run_id)
