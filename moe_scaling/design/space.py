"""The space of architectures a budget search runs over, and their costs.

This module owns the vocabulary of the search: a :class:`Budget` (what the device allows and how
long the model trains), an :class:`ArchSpace` (which architectures are allowed: hardware-friendly
integers around the MobileMoE family, docs/design.md, section 2), its :class:`Trunk` s (d_model,
n_layers, head_dim, n_kv_heads) and :data:`Layout` s (granularity G, n_shared), and the
:class:`ExpertLine` of every expert count on one trunk and layout.

For one trunk and layout every count, byte and FLOP is affine in ``n_experts`` (each expert adds
the same weights and router row), so :func:`expert_line` evaluates :mod:`moe_scaling.costs`
exactly twice and extends the line analytically (exact integer arithmetic for counts). The search
itself (:mod:`moe_scaling.design.search`) scores these lines with a fitted law.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.costs import (DeviceProfile, flops_per_token, host_cache_dir, kv_cache_bytes, latency_terms,
                               load_device, param_counts, weight_bytes)
from moe_scaling.errors import ConfigError
from moe_scaling.units import parse_precision

__all__ = ["COMPUTE_RULES", "Budget", "ArchSpace", "Trunk", "Layout", "ExpertLine", "expert_line", "space_bounds",
           "trunks", "layouts"]


COMPUTE_RULES = ("6N", "3x-forward")


# --------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What the device allows and how long the model trains.

    ``memory`` (bytes) bounds weights at ``weights`` precision (embeddings at ``embeddings``,
    default the same) plus the KV cache of one ``context``-token sequence at ``kv`` precision.
    ``flops_per_token`` bounds forward FLOPs per token at ``context``; ``latency_ms`` bounds the
    decode time per token on ``device`` (:func:`costs.roofline`: a vendor profile's plain roofline,
    or ``this-host``'s measured profile with its fixed costs per kernel call).

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
    """Architectures the search may return (defaults: the MobileMoE family, docs/design.md, section 2).

    ``d_model`` runs over multiples of ``d_model_step`` in [d_model_min, d_model_max];
    ``n_layers`` over [n_layers_min, n_layers_max] with ``aspect_min <= d_model / n_layers <=
    aspect_max`` (MobileMoE-L: 1280 / 32 = 40; OLMoE: 128); ``n_heads = d_model / head_dim`` for
    each ``head_dims`` entry; ``n_kv_heads`` from ``kv_heads`` (must divide n_heads). The dense
    reference FFN is ``d_ff = ffn_mult * d_model``. An MoE layout with granularity G has
    ``d_expert = d_ff / G`` (a multiple of ``expert_multiple``, 64 by default; small study-scale
    spaces lower it); without a shared expert ``top_k = G`` (active FFN
    width d_ff); with one it holds half the active width, ``d_shared = d_ff / 2`` and
    ``top_k = G / 2`` (MobileMoE-L: G = 8, top-4 of width 640 plus a shared 2560). ``n_experts``
    runs from ``max(top_k + 1, G)`` (expansion >= 1) to ``expansion_max * G``. The first entry of ``granularities`` and of
    ``shared`` is the layout used when the law cannot see that knob.

    ``depth_rule``: (d_model, n_layers) pairs, widths ascending; when given, depth is not searched
    but follows them (:meth:`depth`), and ``n_layers_*`` and ``aspect_*`` are unused. A study whose
    runs all follow one depth rule cannot tell a law how depth matters; its closed loop keeps to
    that rule rather than letting a depth-blind law pick the shallowest model the space allows.
    ``n_heads``: when given, every trunk has this many heads (``head_dim = d_model / n_heads``, as a
    study grid with a fixed head count trains) in place of the ``head_dims`` choices.
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
    expert_multiple: int = 64
    granularities: tuple[int, ...] = (8, 1, 2, 4, 16)
    shared: tuple[int, ...] = (1, 0)
    expansion_max: float = 64.0
    router: str = "sigmoid"
    tie_embeddings: bool = True
    qk_norm: bool = True
    rope_theta: float = 500000.0
    max_seq_len: int = 4096
    depth_rule: tuple[tuple[int, int], ...] = ()
    n_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model_min", "d_model_max", "d_model_step", "n_layers_min",
                     "n_layers_max", "ffn_mult", "expert_multiple"):
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
        if self.n_heads is not None and (isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int)
                                         or self.n_heads < 1):
            raise ConfigError(f"space.n_heads = {self.n_heads!r}: must be a whole number >= 1 (or left out)")
        rule = self.depth_rule
        if rule and (any(not isinstance(p, (tuple, list)) or len(p) != 2
                         or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in p) for p in rule)
                     or [p[0] for p in rule] != sorted({p[0] for p in rule})):
            raise ConfigError(f"space.depth_rule = {rule!r}: must be (d_model, n_layers) pairs of whole numbers "
                              ">= 1 with distinct, ascending widths")

    def depth(self, d_model: int) -> int | None:
        """The depth ``depth_rule`` gives width ``d_model`` (None without a rule): that of the largest
        listed width not above it (below the smallest, the smallest's); beyond the largest, that
        width's aspect ratio d_model / n_layers kept (rounded, never shallower than it)."""
        if not self.depth_rule:
            return None
        d_last, L_last = self.depth_rule[-1]
        if d_model > d_last:
            return max(L_last, round(d_model * L_last / d_last))
        return next((L for d, L in reversed(self.depth_rule) if d <= d_model), self.depth_rule[0][1])

    def head_dims_at(self, d_model: int) -> tuple[int, ...]:
        """The head widths a trunk of width ``d_model`` may have: ``d_model / n_heads`` when the
        space fixes the head count (none when it does not divide), else the ``head_dims`` dividing it."""
        if self.n_heads is not None:          # rotary embeddings rotate pairs: an even head width
            hd = d_model // self.n_heads
            return (hd,) if d_model % self.n_heads == 0 and hd % 2 == 0 else ()
        return tuple(hd for hd in self.head_dims if d_model % hd == 0)

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
        depths = [space.depth(d)] if space.depth_rule else range(space.n_layers_min, space.n_layers_max + 1)
        for L in depths:
            if not space.depth_rule and not space.aspect_min <= d / L <= space.aspect_max:
                continue
            for hd in space.head_dims_at(d):
                for kv in space.kv_heads:
                    if (d // hd) % kv == 0:
                        yield Trunk(d, L, hd, kv)


def layouts(space: ArchSpace, d_model: int, granularities: Sequence[int] | None = None,
            shared: Sequence[int] | None = None) -> list[Layout]:
    """MoE layouts valid at ``d_model`` (hardware-friendly widths), in preference order."""
    d_ff, unit = space.ffn_mult * d_model, space.expert_multiple
    out = []
    for s in (space.shared if shared is None else shared):
        for G in (space.granularities if granularities is None else granularities):
            if d_ff % G or (d_ff // G) % unit or (s and (G % 2 or (d_ff // 2) % unit)):
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
    # costs.latency_terms of one decoded token on the budget's device (zeros without a device):
    # each is affine in the expert count, so the line's interpolation is exact
    decode_memory_s: np.ndarray
    decode_compute_s: np.ndarray
    decode_fixed_s: np.ndarray

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


@functools.lru_cache(maxsize=8)
def _device(name: str, stamp: float) -> DeviceProfile:
    """The budget's device profile, read once per (name, file time) rather than per expert line."""
    return load_device(name)


def budget_device(budget: Budget) -> DeviceProfile | None:
    """``budget.device``'s profile (None without one); a re-measured ``this-host`` is read afresh."""
    if budget.device is None:
        return None
    path = host_cache_dir() / f"{budget.device}.yaml"
    return _device(budget.device, path.stat().st_mtime if path.is_file() else 0.0)


def _costs(cfg: ModelConfig, budget: Budget) -> tuple:
    p = param_counts(cfg)
    kv = kv_cache_bytes(cfg, budget.context, budget.kv)
    dev = budget_device(budget)
    t = (latency_terms(cfg, dev, tokens=1, past=budget.context, weights=budget.weights, kv=budget.kv,
                       embeddings=budget.embeddings) if dev is not None else None)
    return (p.total, p.active, p.embedding,
            weight_bytes(cfg, budget.weights, embeddings=budget.embeddings), kv,
            weight_bytes(cfg, budget.weights, embeddings=budget.embeddings, active_only=True) + kv,
            flops_per_token(cfg, budget.context), flops_per_token(cfg, budget.context, training=True),
            t.memory_s if t else 0.0, t.compute_s if t else 0.0, t.fixed_s if t else 0.0)


def expert_line(space: ArchSpace, trunk: Trunk, layout: Layout | None, budget: Budget,
                max_bytes: float | None = None) -> ExpertLine | None:
    """The line of expert counts on ``trunk`` with ``layout`` (None: the dense model), cut where
    ``total_bytes > max_bytes``; None when no point is left."""
    names = ("params_total", "params_active", "params_embedding", "weight_bytes", "kv_cache_bytes",
             "read_bytes", "flops_forward", "flops_training", "decode_memory_s", "decode_compute_s", "decode_fixed_s")
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


def space_bounds(cfg: ModelConfig, space: ArchSpace) -> list[str]:
    """The search-space bounds ``cfg`` sits on: ``d_model_min`` / ``d_model_max``,
    ``n_layers_min`` / ``n_layers_max``, ``aspect_min`` / ``aspect_max`` (d_model / n_layers),
    ``expansion_max``, and ``granularity_min`` / ``granularity_max`` (the ends of the space's
    granularities, when it has several): an optimum there may have been cut off by the space, not by
    a budget. Under a ``depth_rule`` depth is not searched, so no depth or aspect bound applies."""
    aspect = cfg.d_model / cfg.n_layers
    shape = (() if space.depth_rule else
             (("n_layers_min", cfg.n_layers <= space.n_layers_min), ("n_layers_max", cfg.n_layers >= space.n_layers_max),
              ("aspect_min", aspect <= space.aspect_min), ("aspect_max", aspect >= space.aspect_max)))
    hits = [name for name, at in (("d_model_min", cfg.d_model <= space.d_model_min),
                                  ("d_model_max", cfg.d_model >= space.d_model_max), *shape) if at]
    if cfg.is_moe and cfg.expansion >= space.expansion_max:
        hits.append("expansion_max")
    if cfg.is_moe and len(space.granularities) > 1:
        hits += [name for name, at in (("granularity_min", cfg.granularity <= min(space.granularities)),
                                       ("granularity_max", cfg.granularity >= max(space.granularities))) if at]
    return hits
