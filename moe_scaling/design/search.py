"""The on-device sweet spot: the architecture with the lowest predicted loss under a budget.

One module (~530 lines): the single search and its by-compute sweep share the evaluator, the scan state
and the result types; split apart they would import each other's internals.

:func:`search` minimises a fitted law's predicted loss over an :class:`ArchSpace` under a
:class:`Budget` (both in :mod:`moe_scaling.design.space`) and returns a :class:`SearchResult`: the
sweet spot and the best dense model under the same budget (:class:`Candidate` s), the Pareto
frontiers of predicted loss vs memory and vs FLOPs (:class:`FrontierPoint` s), which budget binds,
and the published models on the same cost axes. :meth:`SearchResult.to_dict` is the JSON
``moe-fit --budget-mem ... --json`` prints.

How the search works. Each (trunk, layout) gives an :class:`ExpertLine` of every expert count
with exact costs; the law is evaluated on all of it at once and the line is cut at the budget.
The reported numbers of the sweet spot, the dense model and the published models are recomputed
once each with :func:`costs.cost_summary` (:func:`describe`); frontier points keep the line's
numbers. Spaces up to ``max_exhaustive`` (trunk, layout) lines are searched exhaustively (so
more memory can never give a worse sweet spot); larger spaces use optuna's TPE sampler over trunk
and layout (seeded, deterministic), each trial still scanning its whole expert line exactly, and
the frontier is built from every line the trials scanned.

Knobs a law cannot see. The search probes the law (:func:`law_reads`): a canonical column whose
change leaves every prediction identical is not read. Granularity and the shared expert are then
not searched (the law would pick whichever layout happens to add router parameters); they are
fixed to the first entry of ``ArchSpace.granularities`` / ``ArchSpace.shared`` -- by default
MobileMoE-L's layout, G = 8 and one ungated shared expert holding half the active FFN width --
and the result says so. Knobs no canonical column carries (depth vs width at equal counts,
head_dim, KV heads, router kind) are searched only through their effect on the counts; exact
ties go to the first candidate in enumeration order (preferred layout first, then smaller
d_model, fewer layers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from moe_scaling.costs import load_device, published_models
from moe_scaling.design.candidate import Candidate, FrontierPoint, LossModel, describe, law_columns
from moe_scaling.design.space import (ArchSpace, Budget, ExpertLine, Layout, Trunk, expert_line, layouts, space_bounds,
                                     trunks)
from moe_scaling.errors import ConfigError
from moe_scaling.laws.fit import Fit
from moe_scaling.laws.published import fitted_scale
from moe_scaling.laws.registry import LAW_INPUTS

__all__ = ["law_reads", "search", "SearchResult", "NothingFits", "search_by_compute", "ByCompute", "ComputeRow",
           "BY_COMPUTE_DEFAULT"]


class NothingFits(ConfigError):
    """No architecture of the space meets the budget (raised where a sweet spot is required)."""


def law_reads(model: LossModel, columns: Iterable[str] = ("granularity", "n_shared")) -> dict[str, bool]:
    """Whether ``model`` reads each column: True when changing it changes some prediction on a
    small probe set of MoE shapes (0.1-3B active, E 2-32, G 1-16, 0-1 shared, 1e10-1e13 tokens).
    Granularity is changed as the search changes it, at a fixed FFN width (``d_expert = d_ff / G``), so
    a law that sees G only through the experts' width reads it too."""
    act = np.array([1e8, 3e8, 1e9, 3e9])
    G = np.array([1.0, 4.0, 8.0, 16.0])
    X = law_columns(act, act * 6, act * 0.2, [1e10, 1e11, 1e12, 1e13], [2.0, 4.0, 8.0, 32.0],
                    G, [0.0, 1.0, 0.0, 1.0], np.array([2048.0, 4096.0, 8192.0, 16384.0]) / G)
    base = np.asarray(model.predict(X), dtype=np.float64)
    out = {}
    for c in columns:
        Y = dict(X)
        Y[c] = (1.0 - X[c]) if c == "n_shared" else X[c] * 2.0
        if c == "granularity":          # at a fixed FFN width a finer split has narrower experts
            Y["d_expert"] = X["d_expert"] / 2.0
        out[c] = not np.array_equal(np.asarray(model.predict(Y), dtype=np.float64), base)
    return out


_CONSTRAINTS = ("memory", "flops_per_token", "latency_ms")


class _Evaluator:
    """Scores expert lines: tokens, predicted loss and which constraints each point meets."""

    def __init__(self, model: LossModel, budget: Budget, space: ArchSpace):
        self.model, self.budget, self.space = model, budget, space
        self.device = load_device(budget.device) if budget.device else None

    def tokens(self, line: ExpertLine) -> np.ndarray:
        b = self.budget
        if b.tokens is not None:
            return np.full(line.n.shape, float(b.tokens))
        if b.compute_rule == "6N":
            return b.train_compute / (6.0 * (line.params_active - line.params_embedding))
        return b.train_compute / line.flops_training

    def decode_ms(self, line: ExpertLine) -> np.ndarray | None:
        """costs.roofline's decode time of each point: max(memory, compute) + fixed costs."""
        if self.device is None:
            return None
        return 1e3 * (np.maximum(line.decode_memory_s, line.decode_compute_s) + line.decode_fixed_s)

    def score(self, line: ExpertLine) -> dict[str, np.ndarray]:
        tokens = self.tokens(line)
        if line.layout is None:
            G, S, E = np.ones(line.n.shape), np.zeros(line.n.shape), np.ones(line.n.shape)
        else:
            g, s = line.layout
            G, S, E = np.full(line.n.shape, float(g)), np.full(line.n.shape, float(s)), line.n / g
        d_expert = self.space.ffn_mult * line.trunk.d_model / G
        X = law_columns(line.params_active, line.params_total, line.params_embedding, tokens, E, G, S, d_expert)
        loss = np.asarray(self.model.predict(X), dtype=np.float64)
        ok = {"memory": line.total_bytes <= self.budget.memory}
        if self.budget.flops_per_token is not None:
            ok["flops_per_token"] = line.flops_forward <= self.budget.flops_per_token
        ms = self.decode_ms(line)
        if self.budget.latency_ms is not None:
            ok["latency_ms"] = ms <= self.budget.latency_ms
        loss = np.where(np.isfinite(loss), loss, np.inf)
        return {"loss": loss, "tokens": tokens, "decode_ms": ms, "ok": ok}


@dataclass
class _Best:
    """The lowest-loss point seen so far (first seen wins exact ties)."""

    loss: float = math.inf
    line: ExpertLine | None = None
    i: int = -1

    def offer(self, line: ExpertLine, loss: np.ndarray, mask: np.ndarray) -> None:
        if not mask.any():
            return
        masked = np.where(mask, loss, np.inf)
        i = int(np.argmin(masked))
        if masked[i] < self.loss:
            self.loss, self.line, self.i = float(masked[i]), line, i


class _Pareto:
    """Non-dominated (x, loss) points seen so far, each with its line and index."""

    def __init__(self) -> None:
        self.x = np.empty(0)
        self.loss = np.empty(0)
        self.refs: list[tuple[ExpertLine, int]] = []

    def offer(self, line: ExpertLine, x: np.ndarray, loss: np.ndarray, mask: np.ndarray) -> None:
        idx = np.flatnonzero(mask & np.isfinite(loss))
        if idx.size == 0:
            return
        x_all = np.concatenate([self.x, x[idx]])
        l_all = np.concatenate([self.loss, loss[idx]])
        refs = self.refs + [(line, int(i)) for i in idx]
        order = np.lexsort((l_all, x_all))       # by x, then loss
        keep, best = [], math.inf
        for j in order:
            if l_all[j] < best:
                keep.append(j)
                best = l_all[j]
        self.x, self.loss = x_all[keep], l_all[keep]
        self.refs = [refs[j] for j in keep]


def _tpe(space: ArchSpace, all_trunks: list[Trunk], grans, shared, visit, *, seed: int,
         n_trials: int) -> None:
    """optuna TPE over (trunk, layout); each trial scans its whole expert line exactly."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    choices: list[tuple[Trunk, Layout | None]] = []
    for t in all_trunks:
        choices.append((t, None))
        choices += [(t, lay) for lay in layouts(space, t.d_model, grans, shared)]
    d_models = sorted({t.d_model for t, _ in choices})
    by_key = {}
    for t, lay in choices:
        by_key.setdefault((t.d_model, t.n_layers), []).append((t, lay))

    def objective(trial: "optuna.Trial") -> float:
        d = trial.suggest_categorical("d_model", d_models)
        Ls = sorted({t.n_layers for t, _ in choices if t.d_model == d})
        L = trial.suggest_int(f"n_layers_{d}", Ls[0], Ls[-1])
        L = min(Ls, key=lambda x: (abs(x - L), x))
        opts = by_key[(d, L)]
        k = trial.suggest_int(f"variant_{d}_{L}", 0, len(opts) - 1)
        loss = visit(*opts[k])
        return loss if math.isfinite(loss) else 1e9

    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=n_trials, n_jobs=1)


@dataclass
class SearchResult:
    """What :func:`search` found; :meth:`to_dict` is the JSON ``moe-fit --budget-mem`` prints."""

    budget: Budget
    space: ArchSpace
    sweet_spot: Candidate | None
    dense: Candidate | None
    frontier: list[FrontierPoint]
    frontier_flops: list[FrontierPoint]
    frontier_dense: list[FrontierPoint]
    binding: list[str]
    law: dict[str, Any]
    published: list[dict[str, Any]]
    method: str
    n_evaluated: int

    def to_dict(self) -> dict[str, Any]:
        s, d = self.sweet_spot, self.dense
        return {
            "budget": self.budget.to_dict(), "sweet_spot": s.to_dict() if s else None,
            "dense": d.to_dict() if d else None,
            "moe_advantage": None if not (s and d) else d.predicted_loss - s.predicted_loss,
            "binding": self.binding,
            # the search-space bounds the sweet spot sits on: there the space, not a budget, stopped it
            "space_bounds": space_bounds(s.config, self.space) if s else [],
            "frontier": [p.to_dict() for p in self.frontier],
            "frontier_flops": [p.to_dict() for p in self.frontier_flops],
            "frontier_dense": [p.to_dict() for p in self.frontier_dense],
            "published": self.published, "law_scope": self.law,
            "space": dataclasses.asdict(self.space), "method": self.method,
            "n_evaluated": self.n_evaluated,
        }


class _Scan:
    """The running state of one search: every line visited updates the best point, the best dense
    point, the best point with each constraint relaxed (to tell which binds) and three frontiers."""

    def __init__(self, ev: _Evaluator, max_bytes: float):
        self.ev, self.max_bytes = ev, max_bytes
        self.best, self.best_dense = _Best(), _Best()
        self.relaxed = {c: _Best() for c in _CONSTRAINTS}
        self.front_mem, self.front_dense, self.front_flops = _Pareto(), _Pareto(), _Pareto()
        self.n_evaluated = 0

    def visit(self, trunk: Trunk, layout: Layout | None) -> float:
        """Scan one line; return its lowest feasible loss (inf when nothing on it fits)."""
        line = expert_line(self.ev.space, trunk, layout, self.ev.budget, self.max_bytes)
        if line is None:
            return math.inf
        s = self.ev.score(line)
        self.n_evaluated += line.n.size
        ok, loss = s["ok"], s["loss"]
        others = {c: np.logical_and.reduce([m for k, m in ok.items() if k != c] or [np.ones(line.n.shape, bool)])
                  for c in _CONSTRAINTS}
        feasible = others["memory"] & ok["memory"]
        self.best.offer(line, loss, feasible)
        if layout is None:
            self.best_dense.offer(line, loss, feasible)
            self.front_dense.offer(line, line.total_bytes, loss, others["memory"])
        for c in _CONSTRAINTS:
            self.relaxed[c].offer(line, loss, others[c])
        self.front_mem.offer(line, line.total_bytes, loss, others["memory"])
        self.front_flops.offer(line, line.flops_forward, loss, feasible)
        return float(np.where(feasible, loss, np.inf).min())

    def binding(self) -> list[str]:
        if self.best.line is None:
            return []
        return [c for c in _CONSTRAINTS if self.relaxed[c].loss < self.best.loss] or ["space"]


def search(model: LossModel, budget: Budget, space: ArchSpace = ArchSpace(), *,
           method: str = "auto", seed: int = 0, n_trials: int = 300, max_exhaustive: int = 20000,
           level: float = 0.9, frontier_span: float = 2.0, frontier_points: int = 40) -> SearchResult:
    """Minimise ``model``'s predicted loss over ``space`` under ``budget``.

    ``method``: ``exhaustive``, ``tpe`` (optuna, ``n_trials`` trials, ``seed``) or ``auto``
    (exhaustive up to ``max_exhaustive`` trunk-layout lines). The memory frontier spans memory up to
    ``frontier_span`` x the budget (points past the budget are marked); both frontiers are thinned
    to about ``frontier_points`` points. ``level`` is the bootstrap interval's coverage.
    """
    if method not in ("auto", "exhaustive", "tpe"):
        raise ConfigError(f"method = {method!r}: must be auto, exhaustive or tpe")
    reads = law_reads(model)
    grans = None if reads["granularity"] else space.granularities[:1]
    shared = None if reads["n_shared"] else space.shared[:1]
    all_trunks = list(trunks(space))
    if not all_trunks:
        raise ConfigError("space: no trunk satisfies the d_model / n_layers / aspect / head limits; "
                          "widen the space")
    if method == "auto":
        n_lines = sum(1 + len(layouts(space, t.d_model, grans, shared)) for t in all_trunks)
        method = "exhaustive" if n_lines <= max_exhaustive else "tpe"

    ev = _Evaluator(model, budget, space)
    scan = _Scan(ev, budget.memory * max(1.0, frontier_span))
    if method == "exhaustive":
        for t in all_trunks:
            scan.visit(t, None)
            for lay in layouts(space, t.d_model, grans, shared):
                scan.visit(t, lay)
    else:
        _tpe(space, all_trunks, grans, shared, scan.visit, seed=seed, n_trials=n_trials)

    return SearchResult(
        budget=budget, space=space,
        sweet_spot=_describe(ev, scan.best, level) if scan.best.line is not None else None,
        dense=_describe(ev, scan.best_dense, level) if scan.best_dense.line is not None else None,
        frontier=_thin(ev, scan.front_mem, frontier_points),
        frontier_flops=_thin(ev, scan.front_flops, frontier_points),
        frontier_dense=_thin(ev, scan.front_dense, frontier_points),
        binding=scan.binding(), law={**_law_scope(reads, space, budget), "terms": _terms(model)},
        published=_published(ev, level), method=method, n_evaluated=scan.n_evaluated)


def _terms(model: LossModel) -> list[dict[str, Any]]:
    """Where each term of the law comes from and the scale it was fitted at (a fit's
    ``settings["terms"]``), else one row naming the law and its source."""
    settings = getattr(model, "settings", None) or {}
    if settings.get("terms"):
        return list(settings["terms"])
    law = getattr(model, "law", None)
    source = settings.get("reference") or (f"fitted to {model.n_points} runs" if getattr(model, "n_points", 0) else None)
    scale = fitted_scale(model) if isinstance(model, Fit) else None
    return [{"term": "the whole law", "law": law, "source": source, "scale": scale}]


def _law_scope(reads: dict[str, bool], space: ArchSpace, budget: Budget) -> dict[str, Any]:
    """What the law reads, which knobs were fixed because it cannot see them, and the tie rule."""
    return {
        "reads": reads, "columns": list(LAW_INPUTS),
        "fixed_knobs": ({} if reads["granularity"] and reads["n_shared"] else {
            k: v for k, v in (("granularity", None if reads["granularity"] else space.granularities[0]),
                              ("n_shared", None if reads["n_shared"] else space.shared[0])) if v is not None}),
        # the layouts the law predicts alike (it reads neither knob's value): the output shows them
        "indistinct_layouts": {k: list(v) for k, v in (("granularity", space.granularities), ("n_shared", space.shared))
                               if not reads[k]},
        "not_distinguished": [k for k in ("granularity", "n_shared") if not reads[k]]
        + ["depth vs width at equal counts", "head_dim", "n_kv_heads (beyond its counts and KV bytes)",
           "router kind"],
        "tie_break": ("knobs the law does not read are fixed to the space's preferred layout (first "
                      "entry of granularities / shared: MobileMoE-L's G=8 with one shared expert of "
                      "width d_ff/2); exact ties go to the first candidate in enumeration order "
                      "(smaller d_model, then fewer layers)"),
        "tokens_rule": ("fixed tokens" if budget.tokens is not None else
                        f"tokens = train_compute / {'6 N_active_non_embedding' if budget.compute_rule == '6N' else '(3 x forward FLOPs/token)'}"),
    }




def _point(ev: _Evaluator, line: ExpertLine, i: int) -> FrontierPoint:
    """A frontier point from the line arrays (no recomputation)."""
    s = ev.score(line.take(np.array([i])))
    return FrontierPoint(
        config=line.config(ev.space, i),
        costs={"params_total": int(line.params_total[i]), "params_active": int(line.params_active[i]),
               "weight_bytes": float(line.weight_bytes[i]), "kv_cache_bytes": float(line.kv_cache_bytes[i]),
               "total_bytes": float(line.total_bytes[i]), "flops_per_token_forward": float(line.flops_forward[i])},
        tokens=float(s["tokens"][0]), predicted_loss=float(s["loss"][0]),
        within_budget=bool(np.logical_and.reduce([m for m in s["ok"].values()])[0]),
        decode_ms_per_token=float(s["decode_ms"][0]) if s["decode_ms"] is not None else None)


def _thin(ev: _Evaluator, front: _Pareto, points: int) -> list[FrontierPoint]:
    """About ``points`` frontier points, log-spaced in x (the lowest loss in each bin)."""
    if front.x.size == 0:
        return []
    if front.x.size > points:
        edges = np.geomspace(front.x[0], front.x[-1] * (1 + 1e-12), points + 1)
        bins = np.searchsorted(edges, front.x, side="right")
        last = {}
        for j, b in enumerate(bins):
            last[b] = j                                  # frontier is sorted: last = lowest loss
        keep = sorted(last.values())
    else:
        keep = range(front.x.size)
    return [_point(ev, *front.refs[j]) for j in keep]


def _describe(ev: _Evaluator, best: _Best, level: float) -> Candidate:
    out = describe(ev.model, best.line.config(ev.space, best.i), ev.budget, level=level)
    # the search's arrays and the cost model must agree (every cost is affine in n_experts)
    if not (int(best.line.params_total[best.i]) == out.costs["params_total"]
            and math.isclose(best.loss, out.predicted_loss, rel_tol=1e-9, abs_tol=1e-12)):
        raise AssertionError("search line and cost model disagree; report this as a bug")
    return out


_PUBLISHED_KEYS = ("params_total", "params_active", "n_experts", "top_k", "granularity", "expansion",
                   "weight_bytes", "kv_cache_bytes", "total_bytes", "flops_per_token_forward", "tokens",
                   "predicted_loss", "within_budget")


def _published(ev: _Evaluator, level: float) -> list[dict[str, Any]]:
    """The published models with a config, on the budget's axes (one row each)."""
    keys = _PUBLISHED_KEYS + (("decode_ms_per_token",) if ev.budget.device else ())
    out = []
    for name, m in published_models().items():
        if m.config is None:
            continue
        d = describe(ev.model, m.config, ev.budget, level=level).to_dict()
        out.append({"name": name, "source": m.source, **{k: d[k] for k in keys}})
    return out


# --------------------------------------------------------------------------------------
# The memory-only question: the sweet spot across training-compute budgets
# --------------------------------------------------------------------------------------

BY_COMPUTE_DEFAULT = tuple(10.0 ** e for e in range(19, 26))
"""Training-compute budgets (FLOPs) :func:`search_by_compute` scans by default: 1e19 ... 1e25."""


def _architecture(c: Candidate) -> dict[str, Any]:
    """The sparsity vocabulary of a candidate (docs/design.md, section 3)."""
    cfg = c.config
    return {"is_moe": cfg.is_moe, "expansion": cfg.expansion, "granularity": cfg.granularity,
            "n_shared": cfg.n_shared, "n_experts": cfg.n_experts, "top_k": cfg.top_k,
            "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "params_active": int(c.costs["params_active"]), "params_total": int(c.costs["params_total"]),
            "active_ratio": c.costs["params_active"] / c.costs["params_total"]}


@dataclass(frozen=True)
class ComputeRow:
    """The answer at one training-compute budget: the best model (``sweet_spot``, MoE or dense),
    the best MoE and the best dense model under the same memory (and FLOPs) budget."""

    train_compute: float
    sweet_spot: Candidate
    best_moe: Candidate | None
    dense: Candidate | None

    @property
    def winner(self) -> str:
        return "moe" if self.sweet_spot.config.is_moe else "dense"

    def to_dict(self) -> dict[str, Any]:
        s, m, d = self.sweet_spot, self.best_moe, self.dense
        return {"train_compute": self.train_compute, "winner": self.winner, "architecture": _architecture(s),
                "tokens": s.tokens, "predicted_loss": s.predicted_loss,
                "predicted_loss_interval": list(s.interval) if s.interval else None,
                "dense_loss": d.predicted_loss if d else None,
                "moe_advantage": (d.predicted_loss - m.predicted_loss) if (m and d) else None,
                "sweet_spot": s.to_dict(), "best_moe": m.to_dict() if m else None,
                "dense": d.to_dict() if d else None}


@dataclass(frozen=True)
class ByCompute:
    """:func:`search_by_compute`'s answer: one :class:`ComputeRow` per training-compute budget
    (ascending), and where dense takes over: :attr:`dense_takes_over` at the listed budgets and
    ``crossover``, the compute between the last MoE row and the first dense row where the best
    dense prediction first matches the best MoE one (bisection in log C to 0.5%; None when the rows
    do not go from MoE to dense)."""

    budget: Budget
    rows: tuple[ComputeRow, ...]
    law: dict[str, Any]
    crossover: float | None = None

    @property
    def dense_takes_over(self) -> float | None:
        """The smallest budget from which dense is the sweet spot at it and every larger budget
        listed (None when MoE is the sweet spot at the largest)."""
        out = None
        for row in reversed(self.rows):
            if row.winner != "dense":
                break
            out = row.train_compute
        return out

    def to_dict(self) -> dict[str, Any]:
        base = {k: v for k, v in self.budget.to_dict().items() if k not in ("tokens", "train_compute")}
        return {"budget": base, "rows": [r.to_dict() for r in self.rows],
                "dense_takes_over": self.dense_takes_over, "crossover": self.crossover, "law_scope": self.law}


def search_by_compute(model: LossModel, budget: Budget, computes: Iterable[float] = BY_COMPUTE_DEFAULT,
                      space: ArchSpace = ArchSpace(), *, level: float = 0.9) -> ByCompute:
    """The sweet spot under ``budget``'s memory (and FLOPs / latency) limits at each training
    compute C in ``computes``: tokens per architecture D = C / (6 N) (or the budget's
    ``compute_rule``), whatever ``budget.tokens`` says.

    At a fixed token count a law spends memory on active parameters; at a fixed training compute
    more active parameters mean fewer tokens, so MoE (memory in idle experts) wins at small C and
    dense takes over once C can train the largest dense model that fits (Ludziejewski et al. 2025).
    Every (trunk, layout) expert line is built once, cut at the memory budget, and scored
    exhaustively at every C; granularity and shared experts are searched when the law reads them
    (:func:`law_reads`), else fixed as in :func:`search`."""
    Cs = sorted(float(c) for c in computes)
    if not Cs or any(not (math.isfinite(c) and c > 0) for c in Cs):
        raise ConfigError(f"train_compute budgets {Cs}: need one or more positive numbers")
    reads = law_reads(model)
    grans = None if reads["granularity"] else space.granularities[:1]
    shared = None if reads["n_shared"] else space.shared[:1]
    lines = []
    for t in trunks(space):
        for lay in [None] + layouts(space, t.d_model, grans, shared):
            line = expert_line(space, t, lay, budget, budget.memory)
            if line is not None:
                lines.append(line)

    def best_at(C: float) -> tuple[_Evaluator, _Best, _Best, _Best]:
        ev = _Evaluator(model, dataclasses.replace(budget, tokens=None, train_compute=C), space)
        best, best_moe, best_dense = _Best(), _Best(), _Best()
        for line in lines:
            s = ev.score(line)
            feasible = np.logical_and.reduce(list(s["ok"].values()))
            best.offer(line, s["loss"], feasible)
            (best_moe if line.layout is not None else best_dense).offer(line, s["loss"], feasible)
        return ev, best, best_moe, best_dense

    rows = []
    for C in Cs:
        ev, best, best_moe, best_dense = best_at(C)
        if best.line is None:
            raise NothingFits(f"budget.memory = {budget.memory}: nothing in the space fits; raise it")
        rows.append(ComputeRow(train_compute=C, sweet_spot=_describe(ev, best, level),
                               best_moe=_describe(ev, best_moe, level) if best_moe.line is not None else None,
                               dense=_describe(ev, best_dense, level) if best_dense.line is not None else None))
    crossover = None
    for lo_row, hi_row in zip(rows, rows[1:]):
        if lo_row.winner == "moe" and hi_row.winner == "dense":
            lo, hi = math.log(lo_row.train_compute), math.log(hi_row.train_compute)
            while hi - lo > 0.005:                       # 0.5% in C
                mid = 0.5 * (lo + hi)
                _, _, m, d = best_at(math.exp(mid))
                lo, hi = (mid, hi) if (m.line is not None and m.loss < d.loss) else (lo, mid)
            crossover = math.exp(hi)
    scope = {**_law_scope(reads, space, dataclasses.replace(budget, tokens=None, train_compute=Cs[0])),
             "terms": _terms(model)}
    return ByCompute(budget=budget, rows=tuple(rows), law=scope, crossover=crossover)
