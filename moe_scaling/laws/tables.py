"""Run tables -> fit inputs: reading runs, canonical columns, the arrays one law is fitted to.

:func:`load_runs` reads a sweep directory (its :attr:`~moe_scaling.sweep.layout.SweepDir.runs_table`), a CSV
or a parquet table; :func:`canonical_table` maps its columns to
:data:`~moe_scaling.laws.registry.CANONICAL_COLUMNS`; :func:`prepare` checks and extracts the columns
one law needs (a :class:`FitData`), and ranks runs by training compute for the held-out split
(:func:`holdout_mask`). Bad tables raise :class:`~moe_scaling.laws.errors.FitError` (one line).
See docs/design.md, section 5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from moe_scaling.laws.errors import FitError
from moe_scaling.laws.registry import CANONICAL_COLUMNS, Law
from moe_scaling.sweep.layout import SweepDir

__all__ = ["load_runs", "canonical_table", "FitData", "prepare", "holdout_mask"]

_POSITIVE = ("loss", "params_active", "params_total", "tokens", "expansion", "granularity", "d_expert",
             "train_compute")
_NONNEGATIVE = ("params_embedding", "n_shared")



def load_runs(path: str | Path, columns: Mapping[str, str] | None = None,
              strict: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Read a runs table and map it to canonical columns; returns (table, notes).

    ``path``: a sweep directory (its ``runs.parquet``, :attr:`SweepDir.runs_table`),
    or a CSV (``.csv``, ``.csv.gz``, ``.tsv``) or
    parquet file. Rows with a ``status`` column keep only ``completed``; without a ``loss`` column
    ``eval_loss`` is the loss. ``columns`` maps canonical names to the table's own
    (:func:`canonical_table`, ``strict`` as there).
    """
    p = Path(path)
    notes: list[str] = []
    if p.is_dir():
        p = SweepDir(p).runs_table
        if not p.is_file():
            raise FitError(f"{path}: a sweep directory needs {p.name}; give the sweep folder or a CSV/parquet table")
    if not p.is_file():
        raise FitError(f"{path}: no such file or directory")
    name = p.name.lower()
    try:
        if name.endswith(".parquet"):
            df = pd.read_parquet(p)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
            df = pd.read_csv(p, sep="\t" if name.endswith(".tsv") else ",")
        else:
            raise FitError(f"{path}: unknown table type; give a .csv, .tsv or .parquet file or a sweep directory")
    except FitError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        raise FitError(f"{path}: cannot read table: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if "status" in df.columns:
        done = df["status"].astype(str) == "completed"
        if not done.all():
            notes.append(f"used the {int(done.sum())} completed of {len(df)} runs (status column)")
        df = df[done]
    return canonical_table(df, columns, notes, strict=strict), notes


def canonical_table(df: pd.DataFrame, columns: Mapping[str, str] | None = None,
                    notes: list[str] | None = None, strict: bool = True) -> pd.DataFrame:
    """A copy of ``df`` with canonical columns: ``columns`` maps canonical -> theirs (with
    ``strict=False`` a mapping is skipped when the table lacks ``theirs`` but has ``canonical``); ``loss``
    defaults to ``eval_loss``; ``tokens`` to ``train_compute / (6 params_active)`` (Hoffmann et
    al.'s D = C / 6N) when only training compute is given. Notes on what was derived go to ``notes``."""
    notes = notes if notes is not None else []
    out = df.copy()
    for canonical, theirs in (columns or {}).items():
        if canonical not in CANONICAL_COLUMNS + ("train_compute",):
            raise FitError(f"--column {canonical}={theirs}: {canonical!r} is not a canonical column; "
                           f"use one of {', '.join(CANONICAL_COLUMNS + ('train_compute',))}")
        if theirs not in df.columns:
            if not strict and canonical in df.columns:    # e.g. a --predict table in canonical names
                continue
            raise FitError(f"--column {canonical}={theirs}: the table has no column {theirs!r} "
                           f"(it has {', '.join(map(str, df.columns[:12]))}{', ...' if len(df.columns) > 12 else ''})")
        out[canonical] = df[theirs]
    if "loss" not in out.columns and "eval_loss" in out.columns:
        out["loss"] = out["eval_loss"]
        notes.append("loss = eval_loss")
    if "tokens" not in out.columns and {"train_compute", "params_active"} <= set(out.columns):
        out["tokens"] = pd.to_numeric(out["train_compute"], errors="coerce") / (
            6.0 * pd.to_numeric(out["params_active"], errors="coerce"))
        notes.append("tokens = train_compute / (6 params_active)")
    return out


@dataclass(frozen=True)
class FitData:
    """The arrays one law is fitted to (:func:`prepare`)."""

    cols: dict[str, np.ndarray]     # the law's input columns
    loss: np.ndarray
    compute: np.ndarray             # what "largest compute" ranks runs by
    compute_rule: str
    notes: tuple[str, ...]
    table: pd.DataFrame             # the rows used, in order

    @property
    def n(self) -> int:
        return int(self.loss.size)

    def subset(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The input columns of the rows in ``mask``."""
        return {k: v[mask] for k, v in self.cols.items()}

    def hash(self) -> str:
        """sha256 of the fitted columns (names and float64 bytes)."""
        h = hashlib.sha256()
        for name in sorted(self.cols) + ["loss"]:
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.loss if name == "loss" else self.cols[name], np.float64).tobytes())
        return "sha256:" + h.hexdigest()


def prepare(law: Law, data: pd.DataFrame | Mapping[str, Any], drop_highest_loss: int = 0,
            min_steps: int = 0) -> FitData:
    """Check and extract the columns ``law`` needs: rows with NaN/inf in them are dropped (counted
    in the notes); a missing column, non-positive counts or constant losses raise :class:`FitError`.
    ``min_steps > 0`` first drops the runs of fewer optimizer steps (column ``steps``): runs too short
    for the schedule, whose loss is set by optimisation rather than by size and data."""
    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame({k: np.asarray(v) for k, v in data.items()})
    notes: list[str] = []
    if min_steps:
        if "steps" not in df.columns:
            raise FitError(f"--min-steps {min_steps}: the table has no 'steps' column; map yours with "
                           "--column steps=NAME or drop --min-steps")
        long = (pd.to_numeric(df["steps"], errors="coerce") >= min_steps).to_numpy()
        notes.append(f"dropped {int((~long).sum())} runs of fewer than {min_steps} steps")
        df = df[long]
    needed = ["loss", *law.inputs]
    for c in needed:
        if c not in df.columns and c not in law.optional_inputs:
            raise FitError(f"column {c!r} missing: law {law.name} needs {', '.join(needed)}; "
                           f"map yours with --column {c}=NAME")
    present = [c for c in needed if c in df.columns]
    for c in law.optional_inputs:
        if c not in df.columns:
            notes.append(f"no {c} column: taken as {law.optional_inputs[c]:g}")
    vals = df[present].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    finite = np.isfinite(vals.to_numpy()).all(axis=1)
    if not finite.all():
        notes.append(f"dropped {int((~finite).sum())} rows with NaN/inf in {', '.join(present)}")
    vals, df = vals[finite], df[finite]
    if drop_highest_loss:
        keep = (vals["loss"].rank(method="first", ascending=False) > drop_highest_loss).to_numpy()
        notes.append(f"dropped the {drop_highest_loss} highest-loss rows")
        vals, df = vals[keep], df[keep]
    for c in present:
        bad = (vals[c] < 0) if c in _NONNEGATIVE else (vals[c] <= 0) if c in _POSITIVE else None
        if bad is not None and bad.any():
            raise FitError(f"column {c!r}: {int(bad.sum())} values are {'negative' if c in _NONNEGATIVE else '<= 0'} "
                           f"(first {vals[c][bad].iloc[0]:g}); losses and counts must be positive")
    cols = law.columns({c: vals[c].to_numpy() for c in law.inputs if c in vals})
    for count in ("params_active", "params_total"):
        if count in cols and "params_embedding" in cols and np.any(cols[count] <= cols["params_embedding"]):
            raise FitError(f"column {count!r}: some rows are <= params_embedding; "
                           "the law needs non-embedding parameters > 0")
    loss = vals["loss"].to_numpy()
    if loss.size and np.ptp(loss) == 0:
        raise FitError(f"column 'loss' is constant ({loss[0]:g}) over {loss.size} rows: nothing to fit")
    compute, rule = _compute(df, cols, law)
    return FitData(cols=cols, loss=loss, compute=compute, compute_rule=rule, notes=tuple(notes),
                   table=df.reset_index(drop=True))


def _compute(df: pd.DataFrame, cols: dict[str, np.ndarray], law: Law) -> tuple[np.ndarray, str]:
    """Training compute per run for "hold out the largest compute": 3 x forward FLOPs/token x
    tokens, else 6 x params_active x tokens, else the law's first input (e.g. Clark's N, whose runs
    all train on the same tokens)."""
    def col(name):
        v = pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64) if name in df else None
        return v if v is not None and np.all(np.isfinite(v)) and np.all(v > 0) else None

    tokens, fpt, active = col("tokens"), col("flops_per_token_forward"), col("params_active")
    if tokens is not None and fpt is not None:
        return 3.0 * fpt * tokens, "3 x flops_per_token_forward x tokens"
    if tokens is not None and active is not None:
        return 6.0 * active * tokens, "6 x params_active x tokens"
    first = law.inputs[0]
    return cols[first], f"{first} (no tokens column)"


def holdout_mask(values: np.ndarray, frac: float) -> np.ndarray:
    """Rows to hold out: the largest ``values``, at least ``max(1, round(frac n))`` rows, ties kept
    together (every row equal to the smallest held-out value is held out too)."""
    v = np.asarray(values, np.float64)
    k = max(1, int(round(frac * v.size)))
    threshold = np.sort(v)[::-1][min(k, v.size) - 1]
    return v >= threshold

