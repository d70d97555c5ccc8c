"""Sweep results: per-run record files and the two tables fit and plots read.

Where each file lives in a sweep folder is :class:`moe_scaling.sweep.layout.SweepDir` (its
docstring is the description of the folder).

The record files are the source of truth; the two parquet tables are rebuilt from all of them by
:func:`rebuild_tables` under an exclusive ``fcntl`` lock and replaced atomically (written to a
temporary file, then ``os.replace``), so several workers never lose each other's rows and a
reader mid-sweep always sees a complete file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

import moe_scaling
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_path, exclusive_lock, json_default, write_json
from moe_scaling.costs import flops_per_token, param_counts
from moe_scaling.sweep.layout import SweepDir
from moe_scaling.sweep.liveness import record_worker_gone

__all__ = ["STATUSES", "RESTORED", "write_record",
           "read_record", "write_curve", "read_records", "run_row", "record_from_row", "restore_records",
           "runs_table", "curves_table",
           "rebuild_tables", "tables_lock", "read_manifest", "summarize", "code_version"]

STATUSES = ("completed", "diverged", "failed", "running", "interrupted")
"""A run's status as ``moe-sweep status`` counts it: a record's own status, except ``interrupted``: a
record that says ``running`` whose worker on this machine has gone (:mod:`moe_scaling.sweep.liveness`);
the next ``moe-sweep run`` resumes it from its newest checkpoint."""
CURVE_COLUMNS = ["run_id", "step", "tokens", "train_loss", "eval_loss"]
# Result columns first, in this order; every config field and derived count follows.
LEAD_COLUMNS = ["run_id", "sweep", "status", "eval_loss", "best_eval_loss", "final_train_loss",
                "tokens", "steps", "params_total", "params_active", "params_embedding",
                "flops_per_token_forward", "n_experts", "top_k", "d_expert", "n_shared", "granularity",
                "expansion", "sparsity", "activation_ratio", "d_model", "n_layers", "seed", "wall_s",
                "step_time_s", "tokens_per_s", "diverged_step", "last_good_loss", "error", "attempts"]


def write_record(out: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``DIR/runs/<run_id>/record.json`` atomically."""
    write_json(SweepDir(out).run(record["run_id"]).record, dict(record))


def read_record(out: str | os.PathLike, rid: str) -> dict[str, Any] | None:
    path = SweepDir(out).run(rid).record
    return json.loads(path.read_text()) if path.is_file() else None


def write_curve(out: str | os.PathLike, rid: str, curve: list[Mapping[str, Any]]) -> None:
    """Write ``DIR/runs/<run_id>/curve.json`` atomically (a list of step records)."""
    write_json(SweepDir(out).run(rid).curve, [dict(p) for p in curve])


def read_records(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run record under ``DIR/runs``, sorted by run id."""
    layout = SweepDir(out)
    paths = sorted(p for p in (layout.run(d.name).record for d in layout.runs.glob("*")) if p.is_file())
    return [json.loads(p.read_text()) for p in paths]


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------


_RECORD_FIELDS = ("run_id", "sweep", "status", "eval_loss", "best_eval_loss", "final_train_loss", "tokens",
                  "steps", "wall_s", "step_time_s", "tokens_per_s", "diverged_step", "last_good_loss", "error",
                  "attempts", "corpus_hash", "worker", "started_at", "finished_at")
"""The record's own fields a runs row copies."""

_COMPUTED = ("params_total", "params_active", "params_embedding", "params_non_embedding_total",
             "params_non_embedding_active", "flops_per_token_forward", "granularity", "expansion", "sparsity",
             "activation_ratio", "d_active_ffn", "tokens_budget", "package_version", "code_version")
"""Columns a runs row computes from the config (and the versions): not metrics."""


def run_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One ``runs.parquet`` row from a run record.

    Columns: the result fields of the record (status, eval_loss = final eval loss, best_eval_loss,
    final_train_loss, tokens = tokens trained, steps, wall_s, step_time_s, tokens_per_s,
    diverged_step, last_good_loss, error, attempts, corpus_hash, worker, started_at, finished_at,
    scalar metrics such as dropped_fraction; list metrics as JSON text), the costs (params_total,
    params_active, params_embedding, params_non_embedding_total, params_non_embedding_active,
    flops_per_token_forward at context = seq_len), the derived sparsity vocabulary (granularity,
    expansion, sparsity, activation_ratio, d_active_ffn), every ModelConfig, TrainConfig and
    DataConfig field by its plain name (TrainConfig.tokens, the token budget, as ``tokens_budget``),
    and package_version / code_version.
    """
    cfg = record["config"]
    model = ModelConfig.from_dict(cfg["model"])
    train = TrainConfig.from_dict(cfg["train"])
    data = DataConfig.from_dict(cfg["data"])
    counts = param_counts(model)
    row: dict[str, Any] = {k: record.get(k) for k in _RECORD_FIELDS}
    row.update(params_total=counts.total, params_active=counts.active, params_embedding=counts.embedding,
               params_non_embedding_total=counts.non_embedding_total,
               params_non_embedding_active=counts.non_embedding_active,
               flops_per_token_forward=flops_per_token(model, context=data.seq_len),
               granularity=model.granularity, expansion=model.expansion, sparsity=model.sparsity,
               activation_ratio=model.activation_ratio, d_active_ffn=model.d_active_ffn)
    row.update(model.to_dict())
    for key, value in train.to_dict().items():
        row["tokens_budget" if key == "tokens" else key] = value
    row.update(data.to_dict())
    for key, value in (record.get("metrics") or {}).items():
        scalar = isinstance(value, (int, float, str, bool)) or value is None
        row[key] = value if scalar else json.dumps(value, default=json_default)
    row["package_version"] = record.get("package_version", moe_scaling.__version__)
    row["code_version"] = record.get("code_version")
    return row


def _plain(value: Any) -> Any:
    """A table cell as the record held it: NaN (a missing value) as None, numpy scalars as Python's."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


_WHOLE = ("tokens", "steps", "attempts", "diverged_step")
"""Record fields that are whole numbers (a table column with missing values holds them as floats)."""

RESTORED = ("completed", "diverged", "failed")
"""The statuses :func:`restore_records` restores: runs that ended (a failed one retries only when asked)."""


def record_from_row(row: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record a ``runs.parquet`` row was made from: :func:`run_row` read backwards, so that
    ``run_row(record_from_row(row)) == row``.

    The record's own fields come from their columns. Its ``config`` (``{"model", "train", "data"}``)
    is ``config`` where given (the grid's), else read from the row's ModelConfig, TrainConfig and
    DataConfig columns (``tokens_budget`` as TrainConfig.tokens). A metric of the same name as a
    config field overwrites it in the row (the resolved ``dispatch`` over the configured "auto"), so
    only the grid's config is the run's own; from the columns the config holds the metric's value,
    which gives back the same row. Every other column, and every config column whose value is not the
    config's, is a metric (JSON text of a list or dict read back; missing ones left out)."""
    if config is None:
        config = {}
        for name, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
            columns = {f.name: "tokens_budget" if (cls, f.name) == (TrainConfig, "tokens") else f.name
                       for f in dataclasses.fields(cls)}
            config[name] = cls.from_dict({k: _plain(row[c]) for k, c in columns.items() if c in row}).to_dict()
    configured = {k: v for part in ("model", "train", "data") for k, v in config[part].items()
                  if (part, k) != ("train", "tokens")}
    metrics = {}
    for key in row.keys():
        value = _plain(row[key])
        if key in _RECORD_FIELDS or key in _COMPUTED or value is None:
            continue
        if key in configured and configured[key] == value:
            continue
        metrics[key] = json.loads(value) if isinstance(value, str) and value.startswith(("[", "{")) else value
    record = {k: _plain(row[k]) for k in _RECORD_FIELDS if k in row}
    for k in _WHOLE:
        if isinstance(record.get(k), float) and record[k].is_integer():
            record[k] = int(record[k])
    return record | {"config": dict(config), "metrics": metrics,
                     "package_version": _plain(row.get("package_version")),
                     "code_version": _plain(row.get("code_version"))}


def restore_records(out: str | os.PathLike, configs: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Write the record (and curve) of every run of ``DIR/runs.parquet`` with a result (status in
    :data:`RESTORED`) and no record file, from its row (:func:`record_from_row`, with its config
    from ``configs`` by run id where given: the grid's) and its ``curves.parquet`` points; returns
    their run ids.

    A sweep folder committed or copied without its ``runs/`` folder (the tables travel; records,
    checkpoints and queue stay where the runs trained) keeps its results this way: the records are
    the source of truth, so without them the next table rebuild would drop every such row and the
    sweep would train those runs again. Each restored record says so (``restored_from``). A
    ``failed`` run's record comes back too, so it trains again only with ``--retry-failed`` (from
    its start: its checkpoints stayed behind), as in the folder it came from. Rows of ``running``
    runs are not restored: nothing here can resume them, so such a run trains again from its start
    when a sweep's plan holds it, and its row leaves the table at the next rebuild otherwise. (So
    deleting ``runs/<run_id>/`` alone no longer makes a finished run train again: delete its row
    from the tables too, or use a new ``--out``.)"""
    layout = SweepDir(out)
    if not layout.runs_table.is_file():
        return []
    with tables_lock(out):
        runs = pd.read_parquet(layout.runs_table)
        missing = [i for i, (rid, status) in enumerate(zip(runs["run_id"], runs["status"]))
                   if status in RESTORED and not layout.run(rid).record.is_file()]
        if not missing:
            return []
        curves = (pd.read_parquet(layout.curves_table) if layout.curves_table.is_file()
                  else pd.DataFrame(columns=CURVE_COLUMNS))
        by_run = {rid: points for rid, points in curves.groupby("run_id")}
        restored = []
        for i in missing:
            row = runs.iloc[i].to_dict()
            record = record_from_row(row, (configs or {}).get(row["run_id"])) | {
                "restored_from": layout.runs_table.name}
            rid = record["run_id"]
            points = by_run.get(rid)
            if points is not None:               # the curve first: a record is what makes the run exist
                write_curve(out, rid, [{k: _plain(v) for k, v in p.items() if k != "run_id"}
                                       for p in points.sort_values("step").to_dict("records")])
            write_record(out, record)
            restored.append(rid)
    return restored


def runs_table(records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """The runs table (one row per record, lead columns first)."""
    rows = [run_row(r) for r in records]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=LEAD_COLUMNS)
    lead = [c for c in LEAD_COLUMNS if c in df.columns]
    return df[lead + [c for c in df.columns if c not in lead]]


def curves_table(out: str | os.PathLike, records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """The long curves table for every run whose curve file exists."""
    frames = []
    for r in records:
        path = SweepDir(out).run(r["run_id"]).curve
        if path.is_file():
            points = json.loads(path.read_text())
            if points:
                frame = pd.DataFrame(points)
                frame.insert(0, "run_id", r["run_id"])
                frames.append(frame.reindex(columns=CURVE_COLUMNS))
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df.astype({"step": "int64", "tokens": "int64", "train_loss": "float64", "eval_loss": "float64"})


@contextmanager
def tables_lock(out: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on ``DIR/.tables.lock`` (:attr:`SweepDir.tables_lock`) (released on exit or process death)."""
    with exclusive_lock(SweepDir(out).tables_lock):
        yield


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def rebuild_tables(out: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild ``runs.parquet`` and ``curves.parquet`` from every record file, atomically, under
    the tables lock. Returns the two tables."""
    layout = SweepDir(out)
    with tables_lock(out):
        records = read_records(out)
        runs, curves = runs_table(records), curves_table(out, records)
        _atomic_parquet(runs, layout.runs_table)
        _atomic_parquet(curves, layout.curves_table)
    return runs, curves


# --------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    path = SweepDir(out).manifest
    if not path.is_file():
        raise ConfigError(f"{out}: not a sweep folder (no {path.name}); give the --out folder of "
                          "a moe-sweep run")
    return json.loads(path.read_text())


def summarize(out: str | os.PathLike, top: int = 5) -> dict[str, Any]:
    """Status of a sweep folder from its record files, and for runs without one (a folder that
    came without ``runs/``, e.g. committed) from their rows in ``runs.parquet``: counts per status
    (``pending`` = in the grid, not started here; ``interrupted``: see :data:`STATUSES`), the best
    ``top`` completed runs by final eval loss, and the diverged/failed runs with their step or error.
    Reads only."""
    manifest = read_manifest(out)
    records = [{**r, "status": "interrupted"} if r.get("status") == "running"
               and record_worker_gone(r.get("worker"), r.get("started_at")) else r for r in read_records(out)]
    df = runs_table(records)
    table = SweepDir(out).runs_table
    if table.is_file():
        rows = pd.read_parquet(table)
        rows = rows[~rows["run_id"].isin(set(df["run_id"]))]
        df = pd.concat([d for d in (df, rows) if len(d)], ignore_index=True) if len(rows) else df
    counts = {s: int((df["status"] == s).sum()) if len(df) else 0 for s in STATUSES}
    started = set(df["run_id"]) if len(df) else set()
    counts["pending"] = len([r for r in manifest["runs"] if r not in started])
    keep = ["run_id", "eval_loss", "best_eval_loss", "n_experts", "top_k", "granularity", "n_shared",
            "d_model", "n_layers", "params_active", "params_total", "tokens", "wall_s"]
    done = df[df["status"] == "completed"].sort_values("eval_loss") if len(df) else df
    best = [_clean(r) for r in done[keep].head(top).to_dict("records")] if len(done) else []
    bad = df[df["status"].isin(["diverged", "failed"])] if len(df) else df
    problems = [_clean(r) for r in bad[["run_id", "status", "diverged_step", "last_good_loss",
                                        "error"]].to_dict("records")] if len(bad) else []
    return {"sweep": manifest["name"], "out": str(out), "total": len(manifest["runs"]),
            "counts": counts, "best": best, "problems": problems}


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in row.items()}


@functools.cache
def code_version() -> str:
    """``<package version>+g<git short hash>[.dirty]`` when the package is a git checkout, else the
    package version."""
    version = moe_scaling.__version__
    root = Path(moe_scaling.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}{'.dirty' if dirty else ''}" if sha else version
