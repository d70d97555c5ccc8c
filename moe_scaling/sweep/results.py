"""Sweep results: per-run record files and the two tables fit and plots read.

Where each file lives in a sweep folder is :class:`moe_scaling.sweep.layout.SweepDir` (its
docstring is the description of the folder).

The record files are the source of truth; the two parquet tables are rebuilt from all of them by
:func:`rebuild_tables` under an exclusive ``fcntl`` lock and replaced atomically (written to a
temporary file, then ``os.replace``), so several workers never lose each other's rows and a
reader mid-sweep always sees a complete file.
"""

from __future__ import annotations

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

__all__ = ["STATUSES", "write_record",
           "read_record", "write_curve", "read_records", "run_row", "runs_table", "curves_table",
           "rebuild_tables", "tables_lock", "read_manifest", "summarize", "code_version"]

STATUSES = ("completed", "diverged", "failed", "running")
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
    row: dict[str, Any] = {k: record.get(k) for k in (
        "run_id", "sweep", "status", "eval_loss", "best_eval_loss", "final_train_loss", "tokens",
        "steps", "wall_s", "step_time_s", "tokens_per_s", "diverged_step", "last_good_loss", "error",
        "attempts", "corpus_hash", "worker", "started_at", "finished_at")}
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
    """Status of a sweep folder from its record files: counts per status (``pending`` = in the
    grid, not started here), the best ``top`` completed runs by final eval loss, and the
    diverged/failed runs with their step or error."""
    manifest = read_manifest(out)
    records = read_records(out)
    df = runs_table(records)
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
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


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
