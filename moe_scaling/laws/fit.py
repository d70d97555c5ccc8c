"""Robust scaling-law fits: multi-start L-BFGS-B, bootstrap intervals, held-out selection.

The procedure (DESIGN.md section 5; Besiroglu et al. 2024's reading of Hoffmann et al. 2022):

* residuals ``r = log L - log Lhat`` under a Huber loss (``huber_delta``, default 1e-3), the
  optimiser moving parameters in log space where they are positive (:mod:`moe_scaling.laws.registry`);
* bound-constrained L-BFGS from every start of the law's grid, best kept. All starts run at once:
  :func:`minimize_batch` is a batched projected L-BFGS written in JAX (one objective + autodiff
  gradient evaluation per step for the whole batch, starts refilled into finished slots). The
  grid is first run in float32 (``screen``), then the best distinct results are polished in
  float64 to tight tolerances;
* bootstrap over runs (resampling rows with replacement, refitting from the full-data optimum) for
  percentile intervals on every coefficient and, through the kept parameter samples, on every
  prediction (:meth:`Fit.predict_interval`);
* held-out error: the largest-compute runs held out (``heldout_rmse``) and k-fold; all those
  refits run from the full grid, as batches of row weights, so no held-out run leaks into a fit.
  :func:`select_law` (``moe-fit --law auto``) picks the law with the lowest held-out RMSE;
* too few points for the free parameters (fewer than ``points_per_param`` per parameter): the
  law's reference coefficients are fixed in its ``fix_order`` and the fit's notes say so.

The result is a frozen :class:`Fit`: ``predict(X)``, ``predict_interval(X, level)``,
``save(path)``; :func:`load_fit` reads one back. ``X`` is a dict of canonical column arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from moe_scaling.files import atomic_write_text, json_default
from moe_scaling.laws.registry import CANONICAL_COLUMNS, LAWS, Law, get_law

__all__ = ["Fit", "FitError", "NoSamplesError", "fit_law", "select_law", "load_fit", "published_fit",
           "load_runs", "canonical_table", "prepare", "FitData", "Problem", "make_problem", "fit_starts",
           "bootstrap_refits", "minimize_batch", "holdout_mask", "FORMAT"]

FORMAT = "moe-scaling-fit/1"
_MEMORY = 10                    # L-BFGS history length
_BUFFER = {"float32": 256, "float64": 64}   # slots per batch: one compiled shape per dtype
_POSITIVE = ("loss", "params_active", "params_total", "tokens", "expansion", "granularity",
             "train_compute")
_NONNEGATIVE = ("params_embedding", "n_shared")


class FitError(ValueError):
    """The data or the request cannot give a fit (one line saying what and how to fix it)."""


class NoSamplesError(ValueError):
    """A fit without bootstrap samples (e.g. published coefficients) was asked for an interval."""


# ======================================================================================
# Tables
# ======================================================================================


def load_runs(path: str | Path, columns: Mapping[str, str] | None = None,
              strict: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Read a runs table and map it to canonical columns; returns (table, notes).

    ``path``: a sweep directory (its ``runs.parquet``), or a CSV (``.csv``, ``.csv.gz``, ``.tsv``) or
    parquet file. Rows with a ``status`` column keep only ``completed``; without a ``loss`` column
    ``eval_loss`` is the loss. ``columns`` maps canonical names to the table's own
    (:func:`canonical_table`, ``strict`` as there).
    """
    p = Path(path)
    notes: list[str] = []
    if p.is_dir():
        p = p / "runs.parquet"
        if not p.is_file():
            raise FitError(f"{path}: a sweep directory needs runs.parquet; give the sweep folder or a CSV/parquet table")
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


def prepare(law: Law, data: pd.DataFrame | Mapping[str, Any], drop_highest_loss: int = 0) -> FitData:
    """Check and extract the columns ``law`` needs: rows with NaN/inf in them are dropped (counted
    in the notes); a missing column, non-positive counts or constant losses raise :class:`FitError`."""
    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame({k: np.asarray(v) for k, v in data.items()})
    notes: list[str] = []
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


# ======================================================================================
# The batched optimiser
# ======================================================================================


@dataclass(frozen=True, eq=False)
class Problem:
    """One law on one data set: what the optimiser minimises.

    Parameters are internal coordinates (:mod:`moe_scaling.laws.registry`) in ``law.params`` order; a fixed
    parameter has ``lo == hi`` (the projection pins it, so fixing never recompiles anything).
    ``cols``/``logy`` are the inputs and log losses, ``delta`` the Huber threshold. Build one with
    :func:`make_problem`."""

    law: Law
    lo: np.ndarray
    hi: np.ndarray
    cols: dict[str, np.ndarray]
    logy: np.ndarray
    delta: float

    @property
    def free(self) -> tuple[int, ...]:
        """Indices of the fitted parameters."""
        return tuple(int(i) for i in np.nonzero(self.lo < self.hi)[0])

    def clip(self, x: np.ndarray) -> np.ndarray:
        """``x`` inside the bounds (fixed parameters set to their values)."""
        return np.clip(np.asarray(x, np.float64), self.lo, self.hi)


def _bucket(n: int) -> int:
    """Rows are padded (with weight 0) to a power of two >= 64, so data sets of similar size
    share one compiled kernel."""
    return max(64, 1 << (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _chunk_fn(law: Law, steps: int):
    """A jitted function running ``steps`` evaluations of batched projected L-BFGS."""
    import jax
    import jax.numpy as jnp

    names = law.internal_names

    def objective(Q, W, cols, logy, delta):
        q = {n: Q[:, i:i + 1] for i, n in enumerate(names)}
        r = logy - law.log_form(q, cols, jnp)
        a = jnp.abs(r)
        h = jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
        return jnp.sum(W * h, axis=-1) / (delta * jnp.sum(W, axis=-1))

    def value_and_grad(Q, W, cols, logy, delta):
        f, vjp = jax.vjp(lambda Q_: objective(Q_, W, cols, logy, delta), Q)
        return f, vjp(jnp.ones_like(f))[0]

    def projected(x, g, lo, hi):
        return jnp.where(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)), 0.0, g)

    def direction(g, S, Y, rho):
        """Two-loop recursion; S, Y hold the last _MEMORY pairs, oldest first (rho = 0: empty)."""
        def back(i, c):
            q, alphas = c
            j = _MEMORY - 1 - i
            a = rho[:, j] * jnp.sum(S[:, j] * q, -1)
            return q - a[:, None] * Y[:, j], alphas.at[:, j].set(a)

        q, alphas = jax.lax.fori_loop(0, _MEMORY, back, (g, jnp.zeros_like(rho)))
        has = rho[:, -1] > 0
        sy, yy = jnp.sum(S[:, -1] * Y[:, -1], -1), jnp.sum(Y[:, -1] ** 2, -1)
        first = 1.0 / jnp.maximum(jnp.linalg.norm(g, axis=-1), 1e-30)   # unit first step
        r = jnp.where(has, sy / jnp.where(has, yy, 1.0), first)[:, None] * q

        def forward(j, r):
            b = rho[:, j] * jnp.sum(Y[:, j] * r, -1)
            return r + S[:, j] * (alphas[:, j] - b)[:, None]

        return -jax.lax.fori_loop(0, _MEMORY, forward, r)

    def step(_, st, W, lo, hi, cols, logy, delta, ftol, gtol):
        x, f, g, xt, d, t = st["x"], st["f"], st["g"], st["xt"], st["d"], st["t"]
        ft, gt = value_and_grad(xt, W, cols, logy, delta)
        live = ~st["done"]
        good = jnp.isfinite(ft) & jnp.all(jnp.isfinite(gt), -1)
        ok = live & good & (ft <= f + 1e-4 * jnp.sum(g * (xt - x), -1))
        # accepted: update the curvature pairs, test convergence, move
        s, y = xt - x, (gt - g) * (hi > lo)            # pinned (fixed) parameters carry no curvature
        sy = jnp.sum(s * y, -1)
        store = ok & (sy > 1e-10 * jnp.sum(y * y, -1))
        shift = lambda A, new: jnp.concatenate([A[:, 1:], new[:, None]], 1)  # noqa: E731
        S = jnp.where(store[:, None, None], shift(st["S"], s), st["S"])
        Y = jnp.where(store[:, None, None], shift(st["Y"], y), st["Y"])
        rho = jnp.where(store[:, None], shift(st["rho"], 1.0 / jnp.where(store, sy, 1.0)), st["rho"])
        pg_new = projected(xt, gt, lo, hi)
        conv = ok & jnp.isfinite(f) & (((f - ft) <= ftol * jnp.maximum(jnp.abs(f), jnp.abs(ft)))
                                       | (jnp.max(jnp.abs(pg_new), -1) <= gtol))
        x = jnp.where(ok[:, None], xt, x)
        f, g = jnp.where(ok, ft, f), jnp.where(ok[:, None], gt, g)
        pg = projected(x, g, lo, hi)
        dn = direction(pg, S, Y, rho) * (pg != 0)
        descent = jnp.sum(dn * pg, -1) < 0
        dn = jnp.where(descent[:, None], dn,
                       -pg / jnp.maximum(jnp.linalg.norm(pg, axis=-1, keepdims=True), 1e-30))
        rho = jnp.where((ok & ~descent)[:, None], 0.0, rho)             # restart a bad history
        d = jnp.where(ok[:, None], dn, d)
        # rejected: backtrack along the projected path (safeguarded quadratic interpolation)
        gd = jnp.sum(g * d, -1)
        tq = -gd * t * t / (2.0 * (ft - f - gd * t))
        tq = jnp.where(jnp.isfinite(tq), jnp.clip(tq, 0.1 * t, 0.5 * t), 0.1 * t)
        t = jnp.where(ok, 1.0, tq)
        failed = live & ~ok & (t < 1e-10)
        xt = jnp.clip(x + t[:, None] * d, lo, hi)
        return dict(x=x, f=f, g=g, xt=xt, d=d, t=t, S=S, Y=Y, rho=rho,
                    done=st["done"] | conv | failed, nev=st["nev"] + live.astype(st["nev"].dtype))

    def run(st, W, lo, hi, cols, logy, delta, ftol, gtol):
        body = functools.partial(step, W=W, lo=lo, hi=hi, cols=cols, logy=logy, delta=delta,
                                 ftol=ftol, gtol=gtol)
        return jax.lax.fori_loop(0, steps, body, st)

    return jax.jit(run)


def minimize_batch(problem: Problem, X0: np.ndarray, W_in: np.ndarray, task_w: np.ndarray | None = None, *,
                   dtype: str = "float64", max_evals: int = 2000, ftol: float = 1e-9, gtol: float = 0.0,
                   chunk: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise the Huber objective from every row of ``X0`` (internal parameters ``(T, n_params)``).

    ``W_in`` holds row weights ``(R, n)`` (1 = fitted, 0 = held out, k = drawn k times); task ``i``
    uses ``W_in[task_w[i]]`` (default: row 0). Tasks run in a fixed number of slots (256 in
    float32, 64 in float64) over rows padded to :func:`_bucket` size, so a law compiles once per
    dtype and row bucket, whatever is fixed or held out; a finished slot
    (converged, line search failed, or ``max_evals`` objective evaluations) takes the next task.
    Returns (x ``(T, n_params)``, objective ``(T,)``, evaluations ``(T,)``); a failed start has f = inf.
    """
    import jax
    import jax.numpy as jnp

    X0 = problem.clip(X0)
    T, k = X0.shape
    n, n_pad = problem.logy.size, _bucket(problem.logy.size)
    W_in = np.atleast_2d(np.asarray(W_in, np.float64))
    W = np.zeros((W_in.shape[0], n_pad))
    W[:, :n] = W_in
    task_w = np.zeros(T, int) if task_w is None else np.asarray(task_w, int)
    B = _BUFFER[dtype]
    pad = lambda v: np.concatenate([v, np.repeat(v[:1], n_pad - n)])  # noqa: E731 - weight-0 rows
    run = _chunk_fn(problem.law, chunk)
    x_out, f_out, n_out = X0.copy(), np.full(T, np.inf), np.zeros(T, int)
    zeros = lambda *s: np.zeros((B, *s))  # noqa: E731
    st = dict(x=zeros(k), f=np.full(B, np.inf), g=zeros(k), xt=zeros(k), d=zeros(k), t=np.ones(B),
              S=zeros(_MEMORY, k), Y=zeros(_MEMORY, k), rho=zeros(_MEMORY), done=np.ones(B, bool),
              nev=np.zeros(B, np.int32))
    slot_task, slot_w, nxt = np.full(B, -1), np.ones((B, W.shape[1])), 0
    with jax.enable_x64(True):
        c = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        consts = dict(lo=c(problem.lo), hi=c(problem.hi), cols={m: c(pad(v)) for m, v in problem.cols.items()},
                      logy=c(pad(problem.logy)), delta=c(problem.delta), ftol=c(ftol), gtol=c(gtol))
        while True:
            empty = np.nonzero(slot_task < 0)[0][: T - nxt]
            if empty.size:                          # refill finished slots with new starts
                tasks = np.arange(nxt, nxt + empty.size)
                nxt += empty.size
                slot_task[empty] = tasks
                slot_w[empty] = W[task_w[tasks]]
                for name in ("x", "xt"):
                    st[name][empty] = X0[tasks]
                st["f"][empty], st["t"][empty], st["done"][empty], st["nev"][empty] = np.inf, 1.0, False, 0
                for name in ("g", "d", "S", "Y", "rho"):
                    st[name][empty] = 0.0
                w_dev = c(slot_w)
            if (slot_task < 0).all():
                break
            dev = {n: (jnp.asarray(v) if n in ("done", "nev") else c(v)) for n, v in st.items()}
            st = {n: np.array(v, dtype=np.float64 if v.dtype.kind == "f" else v.dtype)
                  for n, v in run(dev, w_dev, **consts).items()}
            finished = (slot_task >= 0) & (st["done"] | (st["nev"] >= max_evals))
            ids = slot_task[finished]
            x_out[ids], f_out[ids], n_out[ids] = st["x"][finished], st["f"][finished], st["nev"][finished]
            slot_task[finished], st["done"][finished] = -1, True
    f_out[~np.isfinite(f_out)] = np.inf
    return x_out, f_out, n_out


def _distinct(x: np.ndarray, f: np.ndarray, k: int, tol: float = 1e-3) -> np.ndarray:
    """Indices of the ``k`` best finite rows of ``x`` that differ by more than ``tol``."""
    keep: list[int] = []
    for i in np.argsort(f, kind="stable"):
        if not np.isfinite(f[i]) or len(keep) == k:
            break
        if all(np.max(np.abs(x[i] - x[j])) > tol for j in keep):
            keep.append(int(i))
    return np.array(keep, int)


def fit_starts(problem: Problem, starts: np.ndarray, W: np.ndarray | None = None, polish: int = 8,
               screen_evals: int = 100) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The best fit from ``starts`` (internal parameters ``(S, n_params)``) for every row of weights
    ``W`` (``(R, n)``, default one row of ones): every start is run in float32 for at most
    ``screen_evals`` evaluations, then the ``polish`` best distinct results of each row are refined
    in float64 (relative tolerance 1e-10, at most 2,000 evaluations), best kept.
    Returns (x ``(R, n_params)``, objective ``(R,)``, the distinct polished optima of each row, best first)."""
    W = np.ones((1, problem.logy.size)) if W is None else np.atleast_2d(W)
    R, S = W.shape[0], starts.shape[0]
    xs, fs, _ = minimize_batch(problem, np.tile(starts, (R, 1)), W, np.repeat(np.arange(R), S),
                               dtype="float32", max_evals=screen_evals, ftol=1e-6, gtol=1e-6)
    picks = [_distinct(xs[r * S:(r + 1) * S], fs[r * S:(r + 1) * S], polish) + r * S for r in range(R)]
    idx = np.concatenate(picks)
    if idx.size == 0:
        raise FitError(f"law {problem.law.name}: no start gave a finite objective; check the data's units")
    rows = np.repeat(np.arange(R), [p.size for p in picks])
    px, pf, _ = minimize_batch(problem, xs[idx], W, rows, dtype="float64", ftol=1e-10)
    best_x, best_f, optima = np.full((R, starts.shape[1]), np.nan), np.full(R, np.inf), []
    for r in range(R):
        m = rows == r
        order = _distinct(px[m], pf[m], polish)
        optima.append(px[m][order])
        if order.size:
            best_x[r], best_f[r] = px[m][order[0]], pf[m][order[0]]
    return best_x, best_f, optima


def bootstrap_refits(problem: Problem, starts: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """``reps`` refits on runs drawn with replacement (multinomial row weights from
    ``numpy.random.default_rng(seed)``), each from every row of ``starts`` (internal
    parameters, normally the full-data optimum), best kept. Returns internal parameters
    ``(reps, n_params)``; a row is NaN where every start failed."""
    n = problem.logy.size
    draws = np.random.default_rng(seed).integers(0, n, size=(reps, n))
    W = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)
    starts = np.atleast_2d(starts)
    S = starts.shape[0]
    x, f, _ = minimize_batch(problem, np.tile(starts, (reps, 1)), W, np.repeat(np.arange(reps), S),
                             dtype="float64", max_evals=1000)
    f = f.reshape(reps, S)
    out = x.reshape(reps, S, -1)[np.arange(reps), np.argmin(f, axis=1)]
    out[~np.isfinite(f.min(axis=1))] = np.nan
    return out


# ======================================================================================
# The fit
# ======================================================================================


@dataclass(frozen=True, eq=False)
class Fit:
    """A fitted (or published) scaling law.

    Use :meth:`predict` and :meth:`predict_interval` with a dict of canonical column arrays
    (``params_active``, ``params_total``, ``params_embedding``, ``tokens``, ``expansion``,
    ``granularity``, ``n_shared``; extra columns are ignored). Save with :meth:`save`, load with
    :func:`load_fit`.

    Attributes:
        law: the law's registry name (:data:`moe_scaling.laws.registry.LAWS`).
        params: fitted coefficients, natural units.
        intervals: bootstrap percentile interval per coefficient at ``interval_level`` ({} when
            there is no bootstrap); fixed coefficients have a zero-width interval.
        interval_level: coverage of ``intervals`` (e.g. 0.95).
        fixed: coefficients held fixed (``--fix`` or priors for small data), natural units.
        samples: bootstrap parameter draws kept, shape ``(S, n_params)`` in ``law.params`` order,
            or None (published coefficients).
        metrics: ``rmse`` (in-sample, loss units), ``heldout_rmse``, ``kfold_rmse``, ...
        n_points: runs fitted.
        data_hash: sha256 of the fitted columns.
        settings: how it was fitted (Huber delta, bootstrap count, seed, starts, ...).
        notes: what a reader must know (dropped rows, fixed parameters, parameters at bounds).
        source: ``fit`` or ``published``.
    """

    law: str
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    interval_level: float | None = None
    fixed: dict[str, float] = field(default_factory=dict)
    samples: np.ndarray | None = field(default=None, repr=False)
    metrics: dict[str, Any] = field(default_factory=dict)
    n_points: int = 0
    data_hash: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    source: str = "fit"

    @property
    def law_obj(self) -> Law:
        """The :class:`~moe_scaling.laws.registry.Law` this fit is of."""
        return get_law(self.law)

    @property
    def has_samples(self) -> bool:
        """Whether :meth:`predict_interval` can answer (bootstrap samples are stored)."""
        return self.samples is not None and len(self.samples) > 0

    def predict(self, X: Mapping[str, Any]) -> np.ndarray:
        """Predicted loss for each row of ``X`` (dict of canonical column arrays), shape ``(n,)``."""
        return self.law_obj.predict(self.params, X)

    def predict_interval(self, X: Mapping[str, Any], level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) percentile interval of the predicted loss over the bootstrap parameter
        samples: the uncertainty of the fitted law at ``X``, not the spread of single runs around it.
        Raises :class:`NoSamplesError` (a ValueError) when the fit has no samples."""
        if not self.has_samples:
            raise NoSamplesError(f"fit of law {self.law} ({self.source}) has no bootstrap samples, so no "
                                 "prediction interval; refit the runs with --bootstrap N")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level = {level}: must be in (0, 1), e.g. 0.9")
        pred = self.law_obj.predict(self.samples, X)
        tail = 100.0 * (1.0 - level) / 2.0
        with warnings.catch_warnings():                 # rows with missing inputs give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanpercentile(pred, tail, axis=0), np.nanpercentile(pred, 100.0 - tail, axis=0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see :func:`load_fit`)."""
        law = self.law_obj
        return {"format": FORMAT, "law": self.law, "source": self.source, "formula": law.formula,
                "citation": law.citation, "params": dict(self.params),
                "intervals": {k: list(v) for k, v in self.intervals.items()},
                "interval_level": self.interval_level, "fixed": dict(self.fixed),
                "metrics": self.metrics, "n_points": self.n_points, "data_hash": self.data_hash,
                "settings": self.settings, "notes": list(self.notes),
                "samples": None if self.samples is None else {
                    "params": list(law.params), "values": np.asarray(self.samples).tolist()}}

    def save(self, path: str | Path) -> None:
        """Write the fit as JSON (atomically; one bootstrap sample per line)."""
        d = self.to_dict()
        samples = d.pop("samples")
        text = json.dumps(d, indent=1, default=json_default)[:-2]
        if samples is None:
            text += ',\n "samples": null\n}\n'
        else:
            rows = ",\n  ".join(json.dumps(r) for r in samples["values"])
            text += f',\n "samples": {{"params": {json.dumps(samples["params"])}, "values": [\n  {rows}\n ]}}\n}}\n'
        atomic_write_text(path, text)


def load_fit(path: str | Path) -> Fit:
    """Read a fit written by :meth:`Fit.save` (or a published-coefficients file of the same format)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FitError(f"{path}: no such fit file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise FitError(f"{path}: not a fit JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FitError(f"{path}: not a fit JSON (format must be {FORMAT!r})")
    try:
        law = get_law(d["law"])
        params = {k: float(d["params"][k]) for k in law.params}
        samples = d.get("samples")
        if samples is not None:
            if list(samples["params"]) != list(law.params):
                raise ValueError(f"samples.params must be {', '.join(law.params)}")
            samples = np.asarray(samples["values"], np.float64).reshape(-1, len(law.params))
        return Fit(law=law.name, params=params,
                   intervals={k: (float(v[0]), float(v[1])) for k, v in (d.get("intervals") or {}).items()},
                   interval_level=d.get("interval_level"),
                   fixed={k: float(v) for k, v in (d.get("fixed") or {}).items()}, samples=samples,
                   metrics=d.get("metrics") or {}, n_points=int(d.get("n_points") or 0),
                   data_hash=d.get("data_hash"), settings=d.get("settings") or {},
                   notes=tuple(d.get("notes") or ()), source=d.get("source", "fit"))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise FitError(f"{path}: malformed fit JSON ({type(err).__name__}: {err})") from None


def _fixed_params(law: Law, n: int, fix: Mapping[str, float], per_param: float, notes: list[str]) -> dict[str, float]:
    """Parameters to hold fixed: the user's, plus the law's reference values in its ``fix_order``
    while there are fewer than ``per_param`` runs per free parameter (noted in ``notes``)."""
    fixed = {}
    for name, value in fix.items():
        if name not in law.params:
            raise FitError(f"--fix {name}={value}: law {law.name} has no parameter {name!r}; "
                           f"its parameters are {', '.join(law.params)}")
        lo, hi = law.bounds[name]
        if not (math.isfinite(value) and lo <= value <= hi):
            raise FitError(f"--fix {name}={value}: outside the law's bounds [{lo:g}, {hi:g}]")
        fixed[name] = float(value)
    n_free = len(law.params) - len(fixed)
    if n_free == 0:
        raise FitError(f"--fix: every parameter of law {law.name} is fixed; leave at least one free")
    if per_param and n < per_param * n_free:
        if n < per_param:
            raise FitError(f"too few points for law {law.name}: {n} runs; even with all but one parameter "
                           f"fixed to reference values a fit needs {per_param:g}; add runs")
        priors = [p for p in law.fix_order if p not in fixed]
        take = priors[: n_free - max(1, int(n // per_param))]
        if n_free - len(take) > n // per_param:
            raise FitError(f"too few points for law {law.name}: {n} runs for {n_free} free parameters "
                           f"(want {per_param:g} per parameter); fix parameters with --fix name=value")
        for p in take:
            fixed[p] = float(law.reference[p])
        notes.append(f"only {n} runs for {n_free} free parameters (want >= {per_param:g} per parameter): "
                     f"fixed {', '.join(f'{p}={fixed[p]:g}' for p in take)} to the law's reference values "
                     f"({law.citation.split(';')[0].split(',')[0]}) instead of fitting them")
    return fixed


def make_problem(law: str | Law, data: pd.DataFrame | Mapping[str, Any], *, huber_delta: float = 1e-3,
                 fix: Mapping[str, float] | None = None, points_per_param: float = 5.0,
                 drop_highest_loss: int = 0) -> tuple[Problem, FitData, dict[str, float], list[str]]:
    """Prepare ``data`` for ``law`` and decide which parameters are fitted.
    Returns (problem, data, fixed parameters, notes)."""
    law = get_law(law)
    if not (huber_delta > 0 and math.isfinite(huber_delta)):
        raise FitError(f"--huber-delta {huber_delta}: must be a positive number, e.g. 1e-3")
    d = prepare(law, data, drop_highest_loss)
    notes = list(d.notes)
    fixed = _fixed_params(law, d.n, fix or {}, points_per_param, notes)
    lo, hi = law.internal_bounds()
    for i, p in enumerate(law.params):
        if p in fixed:
            lo[i] = hi[i] = law.to_internal({**law.reference, **fixed})[i]
    problem = Problem(law=law, lo=lo, hi=hi, cols=d.cols, logy=np.log(d.loss), delta=float(huber_delta))
    return problem, d, fixed, notes


def _rmse(pred: np.ndarray, obs: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(obs)) ** 2)))


def fit_law(law: str | Law, data: pd.DataFrame | Mapping[str, Any], *, huber_delta: float = 1e-3,
            fix: Mapping[str, float] | None = None, bootstrap: int = 200, seed: int = 0,
            level: float = 0.95, kfold: int = 5, heldout_frac: float = 0.2, heldout_by: str = "compute",
            points_per_param: float = 5.0, starts: np.ndarray | None = None, keep_samples: int = 200,
            drop_highest_loss: int = 0) -> Fit:
    """Fit ``law`` to a runs table with canonical columns (see the module docstring).

    Args:
        law: a registered law name or :class:`~moe_scaling.laws.registry.Law`.
        data: DataFrame or dict of arrays with ``loss`` and the law's inputs; NaN/inf rows dropped.
        huber_delta: Huber threshold on log residuals.
        fix: natural-unit values of parameters to hold fixed.
        bootstrap: bootstrap refits (0: no intervals and no samples).
        seed: seeds the bootstrap draws and the k-fold split.
        level: coverage of the coefficient intervals (``Fit.intervals``).
        kfold: folds for ``kfold_rmse`` (0 or 1: none).
        heldout_frac: share of runs held out for ``heldout_rmse``, largest first, ties together
            (0: none).
        heldout_by: ``compute`` (see :func:`_compute`) or a column, e.g. ``params_active`` for
            "the largest model size".
        points_per_param: below this many runs per free parameter, reference values are fixed.
        starts: internal-coordinate starts ``(S, n_params)``; default the law's grid plus its
            reference point.
        keep_samples: bootstrap draws stored in the fit (for prediction intervals).
        drop_highest_loss: drop this many highest-loss rows first (Besiroglu et al. drop 5).
    """
    law = get_law(law)
    if not 0.0 < level < 1.0:
        raise FitError(f"level = {level}: must be in (0, 1), e.g. 0.95")
    if bootstrap < 0 or kfold < 0 or not 0.0 <= heldout_frac < 1.0:
        raise FitError("bootstrap and kfold must be >= 0 and heldout_frac in [0, 1)")
    problem, d, fixed, notes = make_problem(law, data, huber_delta=huber_delta, fix=fix,
                                            points_per_param=points_per_param,
                                            drop_highest_loss=drop_highest_loss)
    free = problem.free
    if starts is None:
        starts = np.vstack([law.start_grid(), law.to_internal(law.reference)[None]])
    starts = np.unique(problem.clip(starts), axis=0)

    # one weight row per fit: all runs, the largest held out, then k folds; fitted in one batch
    rows, held, fold = [np.ones(d.n)], None, None
    if heldout_frac > 0:
        by = d.compute if heldout_by == "compute" else d.cols.get(heldout_by)
        if by is None and heldout_by in d.table:
            by = pd.to_numeric(d.table[heldout_by], errors="coerce").to_numpy(np.float64)
        if by is None:
            raise FitError(f"heldout_by = {heldout_by!r}: no such column")
        held = holdout_mask(by, heldout_frac)
        if (~held).sum() > len(free):
            rows.append((~held).astype(float))
        else:
            held = None
            notes.append("too few runs to hold out the largest ones: no heldout_rmse")
    if kfold > 1:
        if d.n >= 2 * kfold:
            fold = np.random.default_rng(seed).permutation(d.n) % kfold
            rows += [(fold != i).astype(float) for i in range(kfold)]
        else:
            notes.append(f"too few runs for {kfold}-fold cross-validation: no kfold_rmse")
    bx, bf, optima = fit_starts(problem, starts, np.stack(rows))
    if not np.isfinite(bf[0]):
        raise FitError(f"law {law.name}: no start converged to a finite objective; check the data's units")
    nat = law.to_natural(bx)                                  # (rows, n_params)
    params = dict(zip(law.params, map(float, nat[0])))
    pred = law.predict(nat[0], d.cols)
    metrics: dict[str, Any] = {"rmse": _rmse(pred, d.loss), "mae": float(np.mean(np.abs(pred - d.loss))),
                               "huber_objective": float(bf[0]), "n_free": len(free),
                               "heldout_rmse": None, "kfold_rmse": None}
    r = 1
    if held is not None:
        metrics.update(heldout_rmse=_rmse(law.predict(nat[r], d.subset(held)), d.loss[held]),
                       heldout_n=int(held.sum()),
                       heldout_rule=f"largest {d.compute_rule if heldout_by == 'compute' else heldout_by}")
        if "run_id" in d.table:
            metrics["heldout_run_ids"] = [str(v) for v in d.table["run_id"][held]]
        r += 1
    if fold is not None:
        err = np.empty(d.n)
        for i in range(kfold):
            m = fold == i
            err[m] = law.predict(nat[r + i], d.subset(m)) - d.loss[m]
        metrics.update(kfold_rmse=float(np.sqrt(np.mean(err ** 2))), kfold=int(kfold))

    intervals, samples = {}, None
    if bootstrap:
        draws = bootstrap_refits(problem, optima[0][:1], bootstrap, seed)
        ok = np.isfinite(draws).all(axis=1)
        if not ok.all():
            notes.append(f"{int((~ok).sum())} of {bootstrap} bootstrap refits failed and were left out")
        boot = law.to_natural(draws[ok])
        tail = 100.0 * (1.0 - level) / 2.0
        intervals = {p: (float(np.percentile(boot[:, i], tail)), float(np.percentile(boot[:, i], 100.0 - tail)))
                     for i, p in enumerate(law.params)}
        samples = boot[:keep_samples]
        metrics["bootstrap_ok"] = int(ok.sum())
    x, (blo, bhi) = bx[0], law.internal_bounds()
    for i in free:
        if min(x[i] - blo[i], bhi[i] - x[i]) <= 1e-6 * max(1.0, abs(x[i])):
            notes.append(f"{law.params[i]} = {params[law.params[i]]:.6g} is at its bound: the data do not "
                         "pin it down; consider --fix")
    settings = {"huber_delta": problem.delta, "bootstrap": int(bootstrap), "seed": int(seed),
                "interval_level": level, "kfold": int(kfold), "heldout_frac": float(heldout_frac),
                "heldout_by": heldout_by, "points_per_param": float(points_per_param),
                "n_starts": int(starts.shape[0]), "drop_highest_loss": int(drop_highest_loss),
                "free": [law.params[i] for i in free]}
    return Fit(law=law.name, params=params, intervals=intervals, interval_level=level if bootstrap else None,
               fixed=fixed, samples=samples, metrics=metrics, n_points=d.n, data_hash=d.hash(),
               settings=settings, notes=tuple(notes))


def select_law(data: pd.DataFrame | Mapping[str, Any], candidates: Sequence[str] | None = None,
               **kwargs: Any) -> tuple[Fit, list[dict[str, Any]]]:
    """``--law auto``: fit every candidate (default: the registered laws with ``in_auto`` whose
    inputs the data has), rank by held-out RMSE (the largest-compute runs held out; the k-fold RMSE
    where there is no held-out split), then refit the winner with the bootstrap.

    Returns (the winner's fit, one row per candidate: ``law``, ``heldout_rmse``, ``kfold_rmse``,
    ``rmse``, ``n_free``, or ``skipped`` with the reason). The rows are also in
    ``fit.metrics["candidates"]``."""
    have = set(data.columns if isinstance(data, pd.DataFrame) else data)
    names = list(candidates) if candidates else [n for n, law in LAWS.items() if law.in_auto]
    report, scored = [], []
    for name in names:
        law = get_law(name)
        lacking = [c for c in ("loss", *law.inputs) if c not in have and c not in law.optional_inputs]
        if lacking:
            report.append({"law": name, "skipped": f"no column {', '.join(lacking)}"})
            continue
        try:
            m = fit_law(law, data, **{**kwargs, "bootstrap": 0}).metrics
        except FitError as err:
            report.append({"law": name, "skipped": str(err)})
            continue
        score = m["heldout_rmse"] if m["heldout_rmse"] is not None else m["kfold_rmse"]
        report.append({"law": name, "heldout_rmse": m["heldout_rmse"], "kfold_rmse": m["kfold_rmse"],
                       "rmse": m["rmse"], "n_free": m["n_free"]})
        if score is not None:
            scored.append((score, name))
    if not scored:
        raise FitError("no candidate law could be fitted and scored: "
                       + "; ".join(f"{r['law']}: {r.get('skipped', 'no held-out error')}" for r in report))
    winner = min(scored)[1]
    fit = fit_law(winner, data, **kwargs)
    note = f"law chosen by held-out RMSE among {', '.join(n for _, n in sorted(scored))}"
    if candidates is None:
        note += "; ondevice is not an auto candidate until it wins on our sweeps (use --law ondevice)"
    fit = dataclasses.replace(fit, metrics={**fit.metrics, "candidates": report}, notes=fit.notes + (note,))
    return fit, report


def published_fit(law: str | Law, params: Mapping[str, float], reference: str, notes: Sequence[str] = ()) -> Fit:
    """A :class:`Fit` of published coefficients: no data and no bootstrap samples, so
    :meth:`Fit.predict_interval` raises :class:`NoSamplesError`."""
    lw = get_law(law)
    missing = [p for p in lw.params if p not in params]
    if missing:
        raise FitError(f"published {lw.name}: missing {', '.join(missing)}")
    return Fit(law=lw.name, params={p: float(params[p]) for p in lw.params}, source="published",
               settings={"reference": reference}, notes=tuple(notes))
