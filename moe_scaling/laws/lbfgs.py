r"""Batched projected L-BFGS in JAX: many bound-constrained minimisations of one objective at once.

This module knows nothing about scaling laws. It minimises an :class:`Objective`
``f(x; w) = value(x[None], w[None], data)[0]`` over a box ``lo <= x <= hi`` from many starts and for
many row-weight vectors ``w`` (a data set's rows: 1 fitted, 0 held out, k drawn k times), all in one
batch of ``B`` slots (:data:`_BUFFER`: 256 in float32, 64 in float64). Laws use it through
:mod:`moe_scaling.laws.problem` (the Huber objective on log losses; see docs/design.md, section 5).

The algorithm, per slot (every line below is vectorised over the batch):

* **Projected gradient.** With gradient ``g`` at ``x``, ``pg_i = 0`` where the bound is active and
  ``g`` pushes outward (``x_i <= lo_i, g_i > 0`` or ``x_i >= hi_i, g_i < 0``), else ``pg_i = g_i``.
  A parameter with ``lo_i == hi_i`` is pinned: the projection holds it, its curvature entries
  ``y_i`` are zeroed, so fixing a parameter never changes a compiled shape.
* **Direction: two-loop recursion** (Nocedal & Wright, Algorithm 7.4) over the last :data:`_MEMORY`
  pairs ``s_j = x_{j+1} - x_j``, ``y_j = g_{j+1} - g_j``, ``rho_j = 1 / (s_j . y_j)``:

  .. math::
     q \leftarrow pg;\quad \alpha_j = \rho_j s_j^\top q,\ q \leftarrow q - \alpha_j y_j
     \ (\text{newest first});\quad r = \gamma q,\ \gamma = \frac{s^\top y}{y^\top y}
     \ (\text{newest pair; } 1/\lVert pg\rVert \text{ with no history});\quad
     r \leftarrow r + s_j(\alpha_j - \rho_j y_j^\top r)\ (\text{oldest first});\quad d = -r

  masked to the free coordinates (``pg != 0``). If ``d . pg >= 0`` (not a descent direction) the
  step is the normalised steepest descent ``-pg / ||pg||`` and the history is cleared.
  A pair is stored only if ``s . y > 1e-10 y . y`` (curvature condition), keeping the implicit
  inverse Hessian positive definite.
* **Line search: projected backtracking (Armijo).** The trial point is
  ``xt = clip(x + t d, lo, hi)`` with ``t = 1`` after every accepted step. It is accepted when
  ``f(xt)`` is finite and ``f(xt) <= f(x) + 1e-4 g . (xt - x)``. Otherwise ``t`` shrinks to the
  minimiser of the quadratic through ``f(x)``, ``g . d`` and ``f(x + t d)``,
  ``t_q = -(g.d) t^2 / (2 (f_t - f - (g.d) t))``, safeguarded to ``[0.1 t, 0.5 t]`` (``0.1 t`` when
  not finite). Each loop iteration costs exactly one value-and-gradient evaluation per slot.
* **Stopping.** A slot is done when an accepted step decreases ``f`` by at most
  ``ftol * max(|f|, |f_t|)`` or leaves ``max |pg| <= gtol`` (converged), when ``t < 1e-10`` without
  acceptance (line search failed; the best point so far is kept), or after ``max_evals``
  evaluations. Its next task (start) is then loaded into the slot, so the batch stays full.

Bounds are the only constraint handling: a positive parameter is kept positive by giving it in
log coordinates (the caller's choice; laws do, :mod:`moe_scaling.laws.registry`), not by this module.

Rows are padded to :func:`_bucket` size with weight 0 and the loop is compiled once per
``(value, steps)`` (:func:`_chunk_fn`), dtype and bucket, whatever the starts, weights or bounds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["Objective", "NoFiniteStart", "minimize_batch", "multi_start"]

_MEMORY = 10                    # L-BFGS history length
_BUFFER = {"float32": 256, "float64": 64}   # slots per batch: one compiled shape per dtype
_ARMIJO = 1e-4                  # sufficient-decrease constant of the line search
_T_MIN = 1e-10                  # below this step length the line search has failed


class NoFiniteStart(Exception):
    """No start reached a finite objective (:func:`multi_start`); callers say why in their terms."""


@dataclass(frozen=True, eq=False)
class Objective:
    """A batched objective with box bounds: what :func:`minimize_batch` minimises.

    Attributes:
        value: ``value(Q, W, data) -> (B,)``, traceable by JAX: ``Q`` is ``(B, k)`` parameters,
            ``W`` is ``(B, n)`` row weights (padding rows have weight 0 and must contribute
            nothing), ``data`` is :attr:`data` as JAX arrays. Compiled kernels are cached per
            ``value``, so pass the same function object to reuse them.
        lo, hi: ``(k,)`` bounds; ``lo == hi`` pins a parameter.
        data: a (nested) dict of arrays: leaves with a leading axis are rows (length
            :attr:`n_rows`, padded by repeating row 0); 0-d leaves are constants (traced, so changing
            them does not recompile).
    """

    value: Callable[..., Any]
    lo: np.ndarray
    hi: np.ndarray
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        """Rows of the data (0 when no leaf has a leading axis)."""
        sizes = {np.shape(v)[0] for v in _leaves(self.data) if np.ndim(v) >= 1}
        if len(sizes) > 1:
            raise ValueError(f"data leaves have different row counts {sorted(sizes)}")
        return sizes.pop() if sizes else 0

    @property
    def free(self) -> tuple[int, ...]:
        """Indices of the parameters that move (``lo < hi``)."""
        return tuple(int(i) for i in np.nonzero(np.asarray(self.lo) < np.asarray(self.hi))[0])

    def clip(self, x: np.ndarray) -> np.ndarray:
        """``x`` inside the bounds (pinned parameters set to their values)."""
        return np.clip(np.asarray(x, np.float64), self.lo, self.hi)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _bucket(n: int) -> int:
    """Rows are padded (with weight 0) to a power of two >= 64, so data sets of similar size
    share one compiled kernel."""
    return max(64, 1 << (int(n) - 1).bit_length())


# --------------------------------------------------------------------------------------
# The kernel: one loop iteration = one value-and-gradient evaluation per slot
# --------------------------------------------------------------------------------------


def _projected(x, g, lo, hi):
    """The projected gradient: zero where a bound is active and ``g`` points out of the box."""
    import jax.numpy as jnp
    return jnp.where(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)), 0.0, g)


def _two_loop(g, S, Y, rho):
    """``-H g`` by the two-loop recursion; S, Y hold the last _MEMORY pairs, oldest first
    (``rho = 0``: an empty entry, which leaves ``q`` and ``r`` unchanged)."""
    import jax
    import jax.numpy as jnp

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


def _push_pairs(st, ok, s, y):
    """Append ``(s, y, 1 / s.y)`` to the history of the slots that accepted a step with positive
    curvature; the oldest pair drops out."""
    import jax.numpy as jnp
    sy = jnp.sum(s * y, -1)
    store = ok & (sy > 1e-10 * jnp.sum(y * y, -1))
    shift = lambda A, new: jnp.concatenate([A[:, 1:], new[:, None]], 1)  # noqa: E731
    S = jnp.where(store[:, None, None], shift(st["S"], s), st["S"])
    Y = jnp.where(store[:, None, None], shift(st["Y"], y), st["Y"])
    rho = jnp.where(store[:, None], shift(st["rho"], 1.0 / jnp.where(store, sy, 1.0)), st["rho"])
    return S, Y, rho


def _descent(x, g, S, Y, rho, lo, hi):
    """The next search direction from ``x``: L-BFGS on the projected gradient, or normalised
    steepest descent where that is not a descent direction. Returns (direction, descent?)."""
    import jax.numpy as jnp
    pg = _projected(x, g, lo, hi)
    dn = _two_loop(pg, S, Y, rho) * (pg != 0)
    descent = jnp.sum(dn * pg, -1) < 0
    dn = jnp.where(descent[:, None], dn,
                   -pg / jnp.maximum(jnp.linalg.norm(pg, axis=-1, keepdims=True), 1e-30))
    return dn, descent


def _backtrack(ok, t, f, ft, g, d):
    """The next step length: 1 after an accepted step, else the safeguarded quadratic
    interpolation ``t_q`` in ``[0.1 t, 0.5 t]``."""
    import jax.numpy as jnp
    gd = jnp.sum(g * d, -1)
    tq = -gd * t * t / (2.0 * (ft - f - gd * t))
    tq = jnp.where(jnp.isfinite(tq), jnp.clip(tq, 0.1 * t, 0.5 * t), 0.1 * t)
    return jnp.where(ok, 1.0, tq)


def _step(value, _, st, W, lo, hi, data, ftol, gtol):
    """One iteration for every slot: evaluate the trial point ``xt``, accept it (Armijo) or
    shrink the step, update the history and the direction, test convergence."""
    import jax
    import jax.numpy as jnp

    x, f, g, xt, d, t = st["x"], st["f"], st["g"], st["xt"], st["d"], st["t"]
    ft, vjp = jax.vjp(lambda Q_: value(Q_, W, data), xt)
    gt = vjp(jnp.ones_like(ft))[0]
    live = ~st["done"]
    good = jnp.isfinite(ft) & jnp.all(jnp.isfinite(gt), -1)
    ok = live & good & (ft <= f + _ARMIJO * jnp.sum(g * (xt - x), -1))
    # accepted: update the curvature pairs, test convergence, move
    S, Y, rho = _push_pairs(st, ok, xt - x, (gt - g) * (hi > lo))   # pinned parameters carry no curvature
    pg_new = _projected(xt, gt, lo, hi)
    conv = ok & jnp.isfinite(f) & (((f - ft) <= ftol * jnp.maximum(jnp.abs(f), jnp.abs(ft)))
                                   | (jnp.max(jnp.abs(pg_new), -1) <= gtol))
    x = jnp.where(ok[:, None], xt, x)
    f, g = jnp.where(ok, ft, f), jnp.where(ok[:, None], gt, g)
    dn, descent = _descent(x, g, S, Y, rho, lo, hi)
    rho = jnp.where((ok & ~descent)[:, None], 0.0, rho)             # restart a bad history
    d = jnp.where(ok[:, None], dn, d)
    # rejected: backtrack along the projected path
    t = _backtrack(ok, t, f, ft, g, d)
    failed = live & ~ok & (t < _T_MIN)
    xt = jnp.clip(x + t[:, None] * d, lo, hi)
    return dict(x=x, f=f, g=g, xt=xt, d=d, t=t, S=S, Y=Y, rho=rho,
                done=st["done"] | conv | failed, nev=st["nev"] + live.astype(st["nev"].dtype))


@functools.lru_cache(maxsize=None)
def _chunk_fn(value: Callable[..., Any], steps: int):
    """A jitted function running ``steps`` iterations (:func:`_step`) of batched projected L-BFGS
    on ``value``."""
    import jax

    def run(st, W, lo, hi, data, ftol, gtol):
        body = functools.partial(_step, value, W=W, lo=lo, hi=hi, data=data, ftol=ftol, gtol=gtol)
        return jax.lax.fori_loop(0, steps, body, st)

    return jax.jit(run)


# --------------------------------------------------------------------------------------
# Driving the kernel: slots, refills, multi-start
# --------------------------------------------------------------------------------------


def _empty_state(B: int, k: int) -> dict[str, np.ndarray]:
    zeros = lambda *s: np.zeros((B, *s))  # noqa: E731
    return dict(x=zeros(k), f=np.full(B, np.inf), g=zeros(k), xt=zeros(k), d=zeros(k), t=np.ones(B),
                S=zeros(_MEMORY, k), Y=zeros(_MEMORY, k), rho=zeros(_MEMORY), done=np.ones(B, bool),
                nev=np.zeros(B, np.int32))


def _load(st: dict[str, np.ndarray], slots: np.ndarray, X0: np.ndarray) -> None:
    """Start ``X0`` (one row per slot) in ``slots``: fresh point, no history, step 1."""
    for name in ("x", "xt"):
        st[name][slots] = X0
    st["f"][slots], st["t"][slots], st["done"][slots], st["nev"][slots] = np.inf, 1.0, False, 0
    for name in ("g", "d", "S", "Y", "rho"):
        st[name][slots] = 0.0


def minimize_batch(objective: Objective, X0: np.ndarray, W_in: np.ndarray | None = None,
                   task_w: np.ndarray | None = None, *, dtype: str = "float64", max_evals: int = 2000,
                   ftol: float = 1e-9, gtol: float = 0.0, chunk: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise ``objective`` from every row of ``X0`` (``(T, k)``; clipped into the bounds first).

    ``W_in`` holds row weights ``(R, n)`` (default one row of ones); task ``i`` uses
    ``W_in[task_w[i]]`` (default: row 0). Tasks run in a fixed number of slots (256 in float32, 64
    in float64) over rows padded to :func:`_bucket` size, so an objective compiles once per dtype
    and row bucket, whatever is pinned or weighted; a finished slot (converged, line search failed,
    or ``max_evals`` evaluations, checked every ``chunk`` iterations) takes the next task.
    Returns (x ``(T, k)``, objective ``(T,)``, evaluations ``(T,)``); a failed start has f = inf.
    """
    import jax
    import jax.numpy as jnp

    X0 = objective.clip(X0)
    T, k = X0.shape
    n = objective.n_rows
    n_pad = _bucket(n)
    W_in = np.ones((1, n)) if W_in is None else np.atleast_2d(np.asarray(W_in, np.float64))
    W = np.zeros((W_in.shape[0], n_pad))
    W[:, :n] = W_in
    task_w = np.zeros(T, int) if task_w is None else np.asarray(task_w, int)
    B = _BUFFER[dtype]
    pad = lambda v: v if np.ndim(v) == 0 else np.concatenate([v, np.repeat(v[:1], n_pad - n, 0)])  # noqa: E731
    run = _chunk_fn(objective.value, chunk)
    x_out, f_out, n_out = X0.copy(), np.full(T, np.inf), np.zeros(T, int)
    st = _empty_state(B, k)
    slot_task, slot_w, nxt = np.full(B, -1), np.ones((B, W.shape[1])), 0
    with jax.enable_x64(True):
        c = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        consts = dict(lo=c(objective.lo), hi=c(objective.hi), data=_map(lambda v: c(pad(np.asarray(v))), objective.data),
                      ftol=c(ftol), gtol=c(gtol))
        while True:
            empty = np.nonzero(slot_task < 0)[0][: T - nxt]
            if empty.size:                          # refill finished slots with new starts
                tasks = np.arange(nxt, nxt + empty.size)
                nxt += empty.size
                slot_task[empty] = tasks
                slot_w[empty] = W[task_w[tasks]]
                _load(st, empty, X0[tasks])
                w_dev = c(slot_w)
            if (slot_task < 0).all():
                break
            dev = {m: (jnp.asarray(v) if m in ("done", "nev") else c(v)) for m, v in st.items()}
            st = {m: np.array(v, dtype=np.float64 if v.dtype.kind == "f" else v.dtype)
                  for m, v in run(dev, w_dev, **consts).items()}
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


def multi_start(objective: Objective, starts: np.ndarray, W: np.ndarray | None = None, polish: int = 8,
                screen_evals: int = 100) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The best minimum from ``starts`` (``(S, k)``) for every row of weights ``W`` (``(R, n)``,
    default one row of ones): every start is run in float32 for at most ``screen_evals``
    evaluations (``ftol = gtol = 1e-6``), then the ``polish`` best distinct results (more than 1e-3
    apart in every coordinate) of each row are refined in float64 (``ftol = 1e-10``, at most 2,000
    evaluations), best kept.

    Returns (x ``(R, k)``, objective ``(R,)``, the distinct polished optima of each row, best
    first); a row whose polish found nothing finite has x NaN and objective inf. Raises
    :class:`NoFiniteStart` when no start of any row screened to a finite objective.
    """
    W = np.ones((1, objective.n_rows)) if W is None else np.atleast_2d(W)
    R, S = W.shape[0], starts.shape[0]
    xs, fs, _ = minimize_batch(objective, np.tile(starts, (R, 1)), W, np.repeat(np.arange(R), S),
                               dtype="float32", max_evals=screen_evals, ftol=1e-6, gtol=1e-6)
    picks = [_distinct(xs[r * S:(r + 1) * S], fs[r * S:(r + 1) * S], polish) + r * S for r in range(R)]
    idx = np.concatenate(picks)
    if idx.size == 0:
        raise NoFiniteStart("no start gave a finite objective")
    rows = np.repeat(np.arange(R), [p.size for p in picks])
    px, pf, _ = minimize_batch(objective, xs[idx], W, rows, dtype="float64", ftol=1e-10)
    best_x, best_f, optima = np.full((R, starts.shape[1]), np.nan), np.full(R, np.inf), []
    for r in range(R):
        m = rows == r
        order = _distinct(px[m], pf[m], polish)
        optima.append(px[m][order])
        if order.size:
            best_x[r], best_f[r] = px[m][order[0]], pf[m][order[0]]
    return best_x, best_f, optima
