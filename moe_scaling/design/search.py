"""The on-device sweet spot: the architecture with the lowest predicted loss under a budget.

A :class:`Budget` says what the device allows (bytes for weights + KV cache at a context length,
optionally forward FLOPs per token and roofline decode latency on a device profile) and how long
the model trains (a token count, or a training-compute budget from which tokens follow). An
:class:`ArchSpace` says which architectures are allowed: hardware-friendly integers around the
MobileMoE family (d_model and d_expert multiples of 64, head_dim 64 or 128, fixed vocabulary).
:func:`search` minimises a fitted law's predicted loss over the space and returns a
:class:`SearchResult`: the sweet spot, the best dense model under the same budget, the Pareto
frontiers of predicted loss vs memory and vs FLOPs, which budget binds, and the published models
on the same cost axes.

The law is anything with ``predict(X) -> array`` (and optionally ``predict_interval(X, level)``)
over the canonical columns of :data:`LAW_INPUTS`: ``fit.Fit`` qualifies. ``expansion`` and
``granularity`` are the DESIGN.md section 3 quantities of the config (``n_experts / G`` and
``d_ff / d_expert``), exactly as the results table records them.

How the search works. A *trunk* is (d_model, n_layers, head_dim, n_kv_heads) and a *layout* is
(granularity G, n_shared). For one trunk and layout every count, byte and FLOP is affine in
``n_experts`` (each expert adds the same weights and router row), so two exact evaluations with
:mod:`moe_scaling.costs` give the whole line of expert counts; the line is cut at the budget
analytically and the law is evaluated on all of it at once. The reported numbers of the sweet
spot, the dense model and the published models are recomputed with :func:`costs.cost_summary`.
Spaces up to ``max_exhaustive`` (trunk, layout) lines are searched exhaustively (so more memory can
never give a worse sweet spot); larger spaces use optuna's TPE sampler over trunk and layout
(seeded, deterministic), each trial still scanning its whole expert line exactly, and the frontier
is built from every line the trials scanned.

Knobs a law cannot see. The search probes the law: a canonical column whose change leaves every
prediction identical is not read. Granularity and the shared expert are then not searched (the
law would pick whichever layout happens to add router parameters); they are fixed to the first
entry of ``ArchSpace.granularities`` / ``ArchSpace.shared`` -- by default MobileMoE-L's layout,
G = 8 and one ungated shared expert holding half the active FFN width -- and the result says so.
Knobs no canonical column carries (depth vs width at equal counts, head_dim, KV heads, router
kind) are searched only through their effect on the counts; exact ties go to the first
candidate in enumeration order (preferred layout first, then smaller d_model, fewer layers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.costs import cost_summary, flops_per_token, kv_cache_bytes, load_device, param_counts, published_models, weight_bytes
from moe_scaling.laws.registry import LAW_INPUTS
from moe_scaling.units import format_count, parse_precision

__all__ = [
    "LossModel", "Budget", "ArchSpace", "Trunk", "Layout", "ExpertLine",
    "expert_line", "trunks", "layouts", "law_reads", "search", "SearchResult", "describe_config",
    "budget_table", "published_table",
]


COMPUTE_RULES = ("6N", "3x-forward")


class LossModel(Protocol):
    """What the search needs from a fitted law (``fit.Fit`` is one)."""

    def predict(self, X: Mapping[str, np.ndarray]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What the device allows and how long the model trains.

    ``memory`` (bytes) bounds weights at ``weights`` precision (embeddings at ``embeddings``,
    default the same) plus the KV cache of one ``context``-token sequence at ``kv`` precision.
    ``flops_per_token`` bounds forward FLOPs per token at ``context``; ``latency_ms`` bounds the
    roofline decode time per token on ``device`` (see :func:`costs.roofline`).

    Training: exactly one of ``tokens`` (training tokens D) and ``train_compute`` (training FLOPs
    C). With C, ``compute_rule`` gives D per architecture: ``6N``: D = C / (6 N) with N the active
    non-embedding parameters (Kaplan et al.); ``3x-forward``: D = C / (3 x forward FLOPs per token
    at ``context``), which includes attention, router and LM head.
    """

    memory: int
    weights: str = "int4"
    kv: str = "int8"
    context: int = 4096
    embeddings: str | None = None
    flops_per_token: float | None = None
    latency_ms: float | None = None
    device: str | None = None
    tokens: float | None = None
    train_compute: float | None = None
    compute_rule: str = "6N"

    def __post_init__(self) -> None:
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory <= 0:
            raise ConfigError(f"budget.memory = {self.memory!r}: must be a positive whole number of "
                              "bytes; e.g. --budget-mem 2GB")
        parse_precision(self.weights, field="budget.weights")
        parse_precision(self.kv, field="budget.kv")
        if self.embeddings is not None:
            parse_precision(self.embeddings, field="budget.embeddings")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ConfigError(f"budget.context = {self.context!r}: must be a whole number >= 1; "
                              "e.g. --context 4096")
        for name in ("flops_per_token", "latency_ms", "tokens", "train_compute"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise ConfigError(f"budget.{name} = {v!r}: must be a positive number")
        if (self.tokens is None) == (self.train_compute is None):
            raise ConfigError("budget.tokens / budget.train_compute: give exactly one; e.g. "
                              "--tokens 1e12 or --train-compute 1e21")
        if self.compute_rule not in COMPUTE_RULES:
            raise ConfigError(f"budget.compute_rule = {self.compute_rule!r}: must be one of "
                              f"{', '.join(COMPUTE_RULES)}")
        if self.latency_ms is not None and self.device is None:
            raise ConfigError("budget.latency_ms: needs a device profile; add --device NAME")
        if self.device is not None:
            load_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# The space: trunks x layouts x expert counts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpace:
    """Architectures the search may return (defaults: the MobileMoE family, DESIGN.md section 2).

    ``d_model`` runs over multiples of ``d_model_step`` in [d_model_min, d_model_max];
    ``n_layers`` over [n_layers_min, n_layers_max] with ``aspect_min <= d_model / n_layers <=
    aspect_max`` (MobileMoE-L: 1280 / 32 = 40; OLMoE: 128); ``n_heads = d_model / head_dim`` for
    each ``head_dims`` entry; ``n_kv_heads`` from ``kv_heads`` (must divide n_heads). The dense
    reference FFN is ``d_ff = ffn_mult * d_model``. An MoE layout with granularity G has
    ``d_expert = d_ff / G`` (a multiple of 64); without a shared expert ``top_k = G`` (active FFN
    width d_ff); with one it holds half the active width, ``d_shared = d_ff / 2`` and
    ``top_k = G / 2`` (MobileMoE-L: G = 8, top-4 of width 640 plus a shared 2560). ``n_experts``
    runs from ``max(top_k + 1, G)`` (expansion >= 1) to ``expansion_max * G``. The first entry of ``granularities`` and of
    ``shared`` is the layout used when the law cannot see that knob.
    """

    vocab_size: int = 128256
    d_model_min: int = 512
    d_model_max: int = 4096
    d_model_step: int = 64
    n_layers_min: int = 4
    n_layers_max: int = 64
    aspect_min: float = 32.0
    aspect_max: float = 128.0
    head_dims: tuple[int, ...] = (64, 128)
    kv_heads: tuple[int, ...] = (4,)
    ffn_mult: int = 4
    granularities: tuple[int, ...] = (8, 1, 2, 4, 16)
    shared: tuple[int, ...] = (1, 0)
    expansion_max: float = 64.0
    router: str = "sigmoid"
    tie_embeddings: bool = True
    qk_norm: bool = True
    rope_theta: float = 500000.0
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model_min", "d_model_max", "d_model_step", "n_layers_min",
                     "n_layers_max", "ffn_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"space.{name} = {v!r}: must be a whole number >= 1")
        if self.d_model_min > self.d_model_max or self.n_layers_min > self.n_layers_max:
            raise ConfigError("space: a minimum exceeds its maximum; check d_model_* and n_layers_*")
        if not self.aspect_min <= self.aspect_max:
            raise ConfigError(f"space.aspect_min = {self.aspect_min}: must be <= aspect_max")
        for name in ("head_dims", "kv_heads", "granularities"):
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ConfigError(f"space.{name} = {v!r}: must be a non-empty list of whole numbers >= 1")
        if not self.shared or any(s not in (0, 1) for s in self.shared):
            raise ConfigError(f"space.shared = {self.shared!r}: entries must be 0 or 1")
        if self.router not in ("softmax", "sigmoid"):
            raise ConfigError(f"space.router = {self.router!r}: must be softmax or sigmoid")

    def base(self, trunk: "Trunk") -> dict[str, Any]:
        """ModelConfig fields shared by every model on this trunk (dense FFN of width d_ff)."""
        return dict(vocab_size=self.vocab_size, d_model=trunk.d_model, n_layers=trunk.n_layers,
                    n_heads=trunk.d_model // trunk.head_dim, n_kv_heads=trunk.n_kv_heads,
                    head_dim=trunk.head_dim, d_ff=self.ffn_mult * trunk.d_model,
                    tie_embeddings=self.tie_embeddings, qk_norm=self.qk_norm,
                    rope_theta=float(self.rope_theta), max_seq_len=self.max_seq_len)

    def dense(self, trunk: "Trunk") -> ModelConfig:
        return ModelConfig(**self.base(trunk))

    def moe(self, trunk: "Trunk", layout: "Layout", n_experts: int) -> ModelConfig:
        d_ff = self.ffn_mult * trunk.d_model
        G, shared = layout
        return ModelConfig(**self.base(trunk), n_experts=n_experts, top_k=G // 2 if shared else G,
                           d_expert=d_ff // G, n_shared=shared, d_shared=d_ff // 2 if shared else None,
                           router=self.router)


@dataclass(frozen=True, order=True)
class Trunk:
    """The non-FFN shape of a model."""

    d_model: int
    n_layers: int
    head_dim: int
    n_kv_heads: int


Layout = tuple[int, int]
"""(granularity G, n_shared) of an MoE layer; see :class:`ArchSpace`."""


def trunks(space: ArchSpace) -> Iterator[Trunk]:
    """Every trunk of the space, by d_model, then n_layers, head_dim, n_kv_heads."""
    for d in range(space.d_model_min, space.d_model_max + 1, space.d_model_step):
        for L in range(space.n_layers_min, space.n_layers_max + 1):
            if not space.aspect_min <= d / L <= space.aspect_max:
                continue
            for hd in space.head_dims:
                if d % hd:
                    continue
                for kv in space.kv_heads:
                    if (d // hd) % kv == 0:
                        yield Trunk(d, L, hd, kv)


def layouts(space: ArchSpace, d_model: int, granularities: Sequence[int] | None = None,
            shared: Sequence[int] | None = None) -> list[Layout]:
    """MoE layouts valid at ``d_model`` (hardware-friendly widths), in preference order."""
    d_ff = space.ffn_mult * d_model
    out = []
    for s in (space.shared if shared is None else shared):
        for G in (space.granularities if granularities is None else granularities):
            if d_ff % G or (d_ff // G) % 64 or (s and (G % 2 or (d_ff // 2) % 64)):
                continue
            out.append((G, s))
    return out


@dataclass(frozen=True)
class ExpertLine:
    """Every cost of the models ``n_experts = n[i]`` on one trunk and layout (layout None: the
    dense model, one point). Integer counts are exact int64; bytes and FLOPs float64."""

    trunk: Trunk
    layout: Layout | None
    n: np.ndarray
    params_total: np.ndarray
    params_active: np.ndarray
    params_embedding: np.ndarray
    weight_bytes: np.ndarray
    kv_cache_bytes: np.ndarray
    read_bytes: np.ndarray        # what one decoded token reads: active weights + KV cache
    flops_forward: np.ndarray
    flops_training: np.ndarray

    @property
    def total_bytes(self) -> np.ndarray:
        return self.weight_bytes + self.kv_cache_bytes

    def take(self, idx: np.ndarray) -> "ExpertLine":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[idx]
                                            for f in dataclasses.fields(self)
                                            if f.name not in ("trunk", "layout")})

    def config(self, space: ArchSpace, i: int) -> ModelConfig:
        if self.layout is None:
            return space.dense(self.trunk)
        return space.moe(self.trunk, self.layout, int(self.n[i]))


def _costs(cfg: ModelConfig, budget: Budget) -> tuple[int, int, int, float, float, float, float, float]:
    p = param_counts(cfg)
    kv = kv_cache_bytes(cfg, budget.context, budget.kv)
    return (p.total, p.active, p.embedding,
            weight_bytes(cfg, budget.weights, embeddings=budget.embeddings), kv,
            weight_bytes(cfg, budget.weights, embeddings=budget.embeddings, active_only=True) + kv,
            flops_per_token(cfg, budget.context), flops_per_token(cfg, budget.context, training=True))


def expert_line(space: ArchSpace, trunk: Trunk, layout: Layout | None, budget: Budget,
                max_bytes: float | None = None) -> ExpertLine | None:
    """The line of expert counts on ``trunk`` with ``layout`` (None: the dense model), cut where
    ``total_bytes > max_bytes``; None when no point is left."""
    names = ("params_total", "params_active", "params_embedding", "weight_bytes", "kv_cache_bytes",
             "read_bytes", "flops_forward", "flops_training")
    if layout is None:
        n = np.array([1])
        vals = [np.array([v]) for v in _costs(space.dense(trunk), budget)]
    else:
        G, shared = layout
        n0 = max((G // 2 if shared else G) + 1, G)    # more experts than top_k, expansion >= 1
        n_max = int(math.floor(space.expansion_max * G))
        if n_max < n0:
            return None
        c0 = _costs(space.moe(trunk, layout, n0), budget)
        c1 = _costs(space.moe(trunk, layout, n0 + 1), budget)
        n = np.arange(n0, n_max + 1)
        vals = []
        for a, b in zip(c0, c1):
            if isinstance(a, int):
                vals.append(a + (b - a) * (n - n0))      # exact integer arithmetic
            else:
                vals.append(a + (b - a) * (n - n0).astype(np.float64))
    line = ExpertLine(trunk, layout, n, **dict(zip(names, vals)))
    if max_bytes is not None:
        keep = line.total_bytes <= max_bytes
        if not keep.any():
            return None
        line = line.take(np.flatnonzero(keep))
    return line


# --------------------------------------------------------------------------------------
# The law
# --------------------------------------------------------------------------------------


def law_columns(params_active, params_total, params_embedding, tokens, expansion, granularity,
                n_shared) -> dict[str, np.ndarray]:
    """The canonical column dict a law's ``predict`` receives (float64 arrays)."""
    cols = dict(params_active=params_active, params_total=params_total,
                params_embedding=params_embedding, tokens=tokens, expansion=expansion,
                granularity=granularity, n_shared=n_shared)
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}


def _config_columns(cfgs: Sequence[ModelConfig], tokens: Sequence[float]) -> dict[str, np.ndarray]:
    counts = [param_counts(c) for c in cfgs]
    return law_columns([p.active for p in counts], [p.total for p in counts],
                       [p.embedding for p in counts], tokens, [c.expansion for c in cfgs],
                       [c.granularity for c in cfgs], [c.n_shared for c in cfgs])


def law_reads(model: LossModel, columns: Iterable[str] = ("granularity", "n_shared")) -> dict[str, bool]:
    """Whether ``model`` reads each column: True when changing it changes some prediction on a
    small probe set of MoE shapes (0.1-3B active, E 2-32, G 1-16, 0-1 shared, 1e10-1e13 tokens)."""
    act = np.array([1e8, 3e8, 1e9, 3e9])
    X = law_columns(act, act * 6, act * 0.2, [1e10, 1e11, 1e12, 1e13], [2.0, 4.0, 8.0, 32.0],
                    [1.0, 4.0, 8.0, 16.0], [0.0, 1.0, 0.0, 1.0])
    base = np.asarray(model.predict(X), dtype=np.float64)
    out = {}
    for c in columns:
        Y = dict(X)
        Y[c] = (1.0 - X[c]) if c == "n_shared" else X[c] * 2.0
        out[c] = not np.array_equal(np.asarray(model.predict(Y), dtype=np.float64), base)
    return out


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------


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
        if self.device is None:
            return None
        return 1e3 * np.maximum(line.read_bytes / self.device.memory_bandwidth,
                                line.flops_forward / self.device.peak_ops)

    def score(self, line: ExpertLine) -> dict[str, np.ndarray]:
        tokens = self.tokens(line)
        if line.layout is None:
            G, S, E = np.ones(line.n.shape), np.zeros(line.n.shape), np.ones(line.n.shape)
        else:
            g, s = line.layout
            G, S, E = np.full(line.n.shape, float(g)), np.full(line.n.shape, float(s)), line.n / g
        X = law_columns(line.params_active, line.params_total, line.params_embedding, tokens, E, G, S)
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


@dataclass
class SearchResult:
    """What :func:`search` found; :meth:`to_dict` is the JSON ``moe-fit --budget-mem`` prints."""

    budget: Budget
    space: ArchSpace
    sweet_spot: dict[str, Any] | None
    dense: dict[str, Any] | None
    frontier: list[dict[str, Any]]
    frontier_flops: list[dict[str, Any]]
    frontier_dense: list[dict[str, Any]]
    binding: list[str]
    law: dict[str, Any]
    published: list[dict[str, Any]]
    method: str
    n_evaluated: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(), "sweet_spot": self.sweet_spot, "dense": self.dense,
            "moe_advantage": (None if not (self.sweet_spot and self.dense) else
                              self.dense["predicted_loss"] - self.sweet_spot["predicted_loss"]),
            "binding": self.binding, "frontier": self.frontier, "frontier_flops": self.frontier_flops,
            "frontier_dense": self.frontier_dense, "published": self.published, "law_scope": self.law,
            "space": dataclasses.asdict(self.space), "method": self.method,
            "n_evaluated": self.n_evaluated,
        }


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
    n_lines = sum(1 + len(layouts(space, t.d_model, grans, shared)) for t in all_trunks)
    if method == "auto":
        method = "exhaustive" if n_lines <= max_exhaustive else "tpe"

    ev = _Evaluator(model, budget, space)
    max_bytes = budget.memory * max(1.0, frontier_span)
    best, best_dense = _Best(), _Best()
    relaxed = {c: _Best() for c in _CONSTRAINTS}
    front_mem, front_dense, front_flops = _Pareto(), _Pareto(), _Pareto()
    n_evaluated = 0

    def visit(trunk: Trunk, layout: Layout | None) -> float:
        nonlocal n_evaluated
        line = expert_line(space, trunk, layout, budget, max_bytes)
        if line is None:
            return math.inf
        s = ev.score(line)
        n_evaluated += line.n.size
        ok = s["ok"]
        others = {c: np.logical_and.reduce([m for k, m in ok.items() if k != c] or [np.ones(line.n.shape, bool)])
                  for c in _CONSTRAINTS}
        feasible = others["memory"] & ok["memory"]
        best.offer(line, s["loss"], feasible)
        if layout is None:
            best_dense.offer(line, s["loss"], feasible)
            front_dense.offer(line, line.total_bytes, s["loss"], others["memory"])
        for c in _CONSTRAINTS:
            relaxed[c].offer(line, s["loss"], others[c])
        front_mem.offer(line, line.total_bytes, s["loss"], others["memory"])
        front_flops.offer(line, line.flops_forward, s["loss"], feasible)
        masked = np.where(feasible, s["loss"], np.inf)
        return float(masked.min())

    if method == "exhaustive":
        for t in all_trunks:
            visit(t, None)
            for lay in layouts(space, t.d_model, grans, shared):
                visit(t, lay)
    else:
        _tpe(space, all_trunks, grans, shared, visit, seed=seed, n_trials=n_trials)

    binding = [c for c in _CONSTRAINTS if relaxed[c].loss < best.loss]
    if best.line is not None and not binding:
        binding = ["space"]
    law_info = {
        "reads": reads, "columns": list(LAW_INPUTS),
        "fixed_knobs": ({} if reads["granularity"] and reads["n_shared"] else {
            k: v for k, v in (("granularity", None if reads["granularity"] else space.granularities[0]),
                              ("n_shared", None if reads["n_shared"] else space.shared[0])) if v is not None}),
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
    return SearchResult(
        budget=budget, space=space,
        sweet_spot=_describe(ev, best, level) if best.line is not None else None,
        dense=_describe(ev, best_dense, level) if best_dense.line is not None else None,
        frontier=_thin(ev, front_mem, frontier_points),
        frontier_flops=_thin(ev, front_flops, frontier_points),
        frontier_dense=_thin(ev, front_dense, frontier_points),
        binding=binding if best.line is not None else [], law=law_info,
        published=_published(ev, level), method=method, n_evaluated=n_evaluated)


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


def _row(ev: _Evaluator, line: ExpertLine, i: int) -> dict[str, Any]:
    """A frontier point from the line arrays (no recomputation)."""
    s = ev.score(line.take(np.array([i])))
    cfg = line.config(ev.space, i)
    row = {
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim,
        "n_kv_heads": cfg.n_kv_heads, "n_experts": cfg.n_experts, "top_k": cfg.top_k,
        "granularity": cfg.granularity, "n_shared": cfg.n_shared, "expansion": cfg.expansion,
        "is_moe": cfg.is_moe, "params_total": int(line.params_total[i]),
        "params_active": int(line.params_active[i]), "weight_bytes": float(line.weight_bytes[i]),
        "kv_cache_bytes": float(line.kv_cache_bytes[i]), "total_bytes": float(line.total_bytes[i]),
        "flops_per_token_forward": float(line.flops_forward[i]), "tokens": float(s["tokens"][0]),
        "predicted_loss": float(s["loss"][0]),
        "within_budget": bool(np.logical_and.reduce([m for m in s["ok"].values()])[0]),
    }
    if s["decode_ms"] is not None:
        row["decode_ms_per_token"] = float(s["decode_ms"][0])
    return row


def _thin(ev: _Evaluator, front: _Pareto, points: int) -> list[dict[str, Any]]:
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
    return [_row(ev, *front.refs[j]) for j in keep]


def _interval(model: LossModel, X: dict[str, np.ndarray], level: float) -> tuple[list | None, str | None]:
    fn = getattr(model, "predict_interval", None)
    if fn is None or getattr(model, "has_samples", True) is False:
        return None, ("no interval: the fit has no bootstrap samples (published coefficients); "
                      "refit runs with a bootstrap for one")
    try:
        lo, hi = fn(X, level=level)
    except Exception as err:  # noqa: BLE001 - an interval is optional; say why there is none
        return None, f"no interval: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return [float(np.asarray(lo).ravel()[0]), float(np.asarray(hi).ravel()[0])], None


def describe_config(model: LossModel, cfg: ModelConfig, budget: Budget, *, level: float = 0.9) -> dict[str, Any]:
    """A config on the budget's cost axes: ModelConfig fields, exact costs (costs.cost_summary),
    training tokens, predicted loss and its bootstrap interval, and whether it fits the budget."""
    s = cost_summary(cfg, weights=budget.weights, kv=budget.kv, context=budget.context,
                     device=budget.device, embeddings=budget.embeddings)
    p = param_counts(cfg)
    if budget.tokens is not None:
        tokens = float(budget.tokens)
    elif budget.compute_rule == "6N":
        tokens = budget.train_compute / (6.0 * p.non_embedding_active)
    else:
        tokens = budget.train_compute / s["flops_per_token_training"]
    X = _config_columns([cfg], [tokens])
    loss = float(np.asarray(model.predict(X), dtype=np.float64)[0])
    interval, note = _interval(model, X, level)
    fits = {"memory": s["total_bytes"] <= budget.memory}
    if budget.flops_per_token is not None:
        fits["flops_per_token"] = s["flops_per_token_forward"] <= budget.flops_per_token
    if budget.latency_ms is not None:
        fits["latency_ms"] = s["decode_ms_per_token"] <= budget.latency_ms
    out = {**cfg.to_dict(), **{k: v for k, v in s.items() if k not in cfg.to_dict()},
           "tokens": tokens, "predicted_loss": loss, "predicted_loss_interval": interval,
           "interval_level": level if interval else None, "within_budget": all(fits.values()),
           "budget_use": {"memory": s["total_bytes"] / budget.memory,
                          **({"flops_per_token": s["flops_per_token_forward"] / budget.flops_per_token}
                             if budget.flops_per_token else {}),
                          **({"latency_ms": s["decode_ms_per_token"] / budget.latency_ms}
                             if budget.latency_ms else {})}}
    if note:
        out["interval_note"] = note
    return out


def _describe(ev: _Evaluator, best: _Best, level: float) -> dict[str, Any]:
    cfg = best.line.config(ev.space, best.i)
    out = describe_config(ev.model, cfg, ev.budget, level=level)
    # the search's arrays and the cost model must agree (every cost is affine in n_experts)
    if not (int(best.line.params_total[best.i]) == out["params_total"]
            and math.isclose(best.loss, out["predicted_loss"], rel_tol=1e-9, abs_tol=1e-12)):
        raise AssertionError("search line and cost model disagree; report this as a bug")
    return out


def _published(ev: _Evaluator, level: float) -> list[dict[str, Any]]:
    out = []
    for name, m in published_models().items():
        if m.config is None:
            continue
        d = describe_config(ev.model, m.config, ev.budget, level=level)
        out.append({"name": name, "source": m.source, **{k: d[k] for k in (
            "params_total", "params_active", "n_experts", "top_k", "granularity", "expansion",
            "weight_bytes", "kv_cache_bytes", "total_bytes", "flops_per_token_forward", "tokens",
            "predicted_loss", "within_budget") + (("decode_ms_per_token",) if ev.budget.device else ())}})
    return out


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def budget_table(results: Sequence[SearchResult]) -> str:
    """A Markdown table: one row per budget, the sweet spot beside the best dense model."""
    head = ("| budget | sweet spot (d x layers, experts top-k + shared) | active / total | E | bytes | "
            "GFLOPs/token | predicted loss | binds | best dense (d x layers) | dense active | dense loss |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in results:
        s, d = r.sweet_spot, r.dense
        if s is None:
            rows.append(f"| {r.budget.memory / 1e9:g} GB | nothing fits | | | | | | | | | |")
            continue
        arch = (f"{s['d_model']} x {s['n_layers']}, {s['n_experts']} x {s['d_expert']} top-{s['top_k']}"
                f"{' + ' + str(s['n_shared']) + ' x ' + str(s['d_shared']) if s['n_shared'] else ''}"
                if s["n_experts"] > 1 else f"{s['d_model']} x {s['n_layers']} dense")
        iv = s["predicted_loss_interval"]
        loss = f"{s['predicted_loss']:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")
        dense = (f"{d['d_model']} x {d['n_layers']}", format_count(d["params_active"]),
                 f"{d['predicted_loss']:.4f}") if d else ("-", "-", "-")
        rows.append(f"| {r.budget.memory / 1e9:g} GB | {arch} | {format_count(s['params_active'])} / "
                    f"{format_count(s['params_total'])} | {s['expansion']:g} | {s['total_bytes'] / 1e9:.2f} GB | "
                    f"{s['flops_per_token_forward'] / 1e9:.2f} | {loss} | {', '.join(r.binding)} | "
                    f"{dense[0]} | {dense[1]} | {dense[2]} |")
    return "\n".join(rows)


def published_table(result: SearchResult) -> str:
    """A Markdown table of the published models on the result's cost axes."""
    b = result.budget
    ms = b.device is not None
    rows = [f"| model | active / total | E | bytes ({b.weights}, KV {b.kv} @ {b.context}) | GFLOPs/token |"
            + (f" decode ms/token ({b.device}) |" if ms else "") + " tokens | predicted loss |",
            "|---|---|---|---|---|" + ("---|" if ms else "") + "---|---|"]
    for p in result.published:
        rows.append(f"| {p['name']} | {format_count(p['params_active'])} / {format_count(p['params_total'])} | {p['expansion']:g} | "
                    f"{p['total_bytes'] / 1e9:.2f} GB | {p['flops_per_token_forward'] / 1e9:.2f} |"
                    + (f" {p['decode_ms_per_token']:.1f} |" if ms else "")
                    + f" {p['tokens']:.3g} | {p['predicted_loss']:.4f} |")
    return "\n".join(rows)
