"""What a budget search hands on: a described architecture (:class:`Candidate`) and a frontier
point (:class:`FrontierPoint`), plus the canonical law columns both are scored on.

A :class:`Candidate` holds a :class:`ModelConfig` with its exact costs on the budget's axes
(:func:`moe_scaling.costs.cost_summary`, computed once, in :func:`describe`), its training tokens,
the law's predicted loss and bootstrap interval, and how much of each budget it uses.
:meth:`Candidate.to_dict` is the JSON object ``moe-fit --budget-mem ... --json`` prints as
``sweet_spot`` / ``dense``; :meth:`Candidate.from_dict` reads one back (``moe-build --sweet-spot``).
A :class:`FrontierPoint` is a cheaper record, taken from the search's expert-line arrays without
recomputation (:meth:`FrontierPoint.to_dict` is one ``frontier`` row).

Both read as their JSON form (read-only :class:`~collections.abc.Mapping`), so figures and
notebooks index a search result and a saved ``moe-fit --json`` the same way.

The law is anything with ``predict(X) -> array`` (and optionally ``predict_interval(X, level)``)
over the canonical columns of :data:`moe_scaling.laws.registry.LAW_INPUTS`; ``expansion`` and
``granularity`` are the docs/design.md, section 3 quantities of the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.costs import cost_summary, param_counts
from moe_scaling.design.space import Budget
from moe_scaling.errors import ConfigError

__all__ = ["LossModel", "law_columns", "config_columns", "Candidate", "FrontierPoint", "describe"]


class LossModel(Protocol):
    """What the search needs from a fitted law (``laws.fit.Fit`` is one)."""

    def predict(self, X: Mapping[str, np.ndarray]) -> np.ndarray: ...


def law_columns(params_active, params_total, params_embedding, tokens, expansion, granularity,
                n_shared, d_expert) -> dict[str, np.ndarray]:
    """The canonical column dict a law's ``predict`` receives (float64 arrays, broadcast to one shape)."""
    cols = dict(params_active=params_active, params_total=params_total,
                params_embedding=params_embedding, tokens=tokens, expansion=expansion,
                granularity=granularity, n_shared=n_shared, d_expert=d_expert)
    arrays = np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in cols.values()])
    return {k: np.array(v) for k, v in zip(cols, arrays)}


def config_columns(cfgs: Sequence[ModelConfig], tokens: Sequence[float]) -> dict[str, np.ndarray]:
    """:func:`law_columns` of whole configs trained on ``tokens`` each."""
    counts = [param_counts(c) for c in cfgs]
    return law_columns([p.active for p in counts], [p.total for p in counts],
                       [p.embedding for p in counts], tokens, [c.expansion for c in cfgs],
                       [c.granularity for c in cfgs], [c.n_shared for c in cfgs], [c.d_expert for c in cfgs])


class _ReadsAsDict(Mapping):
    """Read-only mapping access to ``to_dict()`` (the JSON form)."""

    def to_dict(self) -> dict[str, Any]:                  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


_MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))
_OWN_KEYS = ("tokens", "predicted_loss", "predicted_loss_interval", "interval_level",
             "within_budget", "budget_use", "interval_note")


@dataclass(frozen=True, eq=True)
class Candidate(_ReadsAsDict):
    """A described architecture: config, exact costs, tokens, predicted loss, budget use.

    ``costs`` is :func:`moe_scaling.costs.cost_summary` of ``config`` on the budget's precisions,
    context and device (for a candidate read back by :meth:`from_dict`: whatever cost keys the
    file held). ``interval`` is the bootstrap interval of ``predicted_loss`` at
    ``interval_level`` (None, with ``interval_note`` saying why, when the law has none).
    """

    config: ModelConfig
    costs: Mapping[str, Any]
    tokens: float
    predicted_loss: float
    interval: tuple[float, float] | None = None
    interval_level: float | None = None
    interval_note: str | None = None
    within_budget: bool | None = None
    budget_use: Mapping[str, float] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ModelConfig fields, then the cost keys it lacks, then the prediction."""
        cfg = self.config.to_dict()
        out = {**cfg, **{k: v for k, v in self.costs.items() if k not in cfg},
               "tokens": self.tokens, "predicted_loss": self.predicted_loss,
               "predicted_loss_interval": list(self.interval) if self.interval else None,
               "interval_level": self.interval_level, "within_budget": self.within_budget,
               "budget_use": dict(self.budget_use) if self.budget_use is not None else None}
        if self.interval_note:
            out["interval_note"] = self.interval_note
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> "Candidate":
        """A candidate from a ``moe-fit --json`` output (its ``sweet_spot``) or a sweet spot itself;
        raises :class:`ConfigError` naming the missing keys."""
        spot = doc.get("sweet_spot", doc) if isinstance(doc, Mapping) else None
        if not isinstance(spot, Mapping):
            raise ConfigError("sweet spot: expected a JSON object with 'sweet_spot' (moe-fit --json) "
                              "or the sweet spot's ModelConfig fields")
        missing = [n for n in ("vocab_size", "d_model", "n_layers", "n_heads", "tokens", "predicted_loss")
                   if n not in spot]
        if missing:
            raise ConfigError(f"sweet spot: missing {', '.join(missing)}; pass the JSON moe-fit --json wrote")
        iv = spot.get("predicted_loss_interval")
        return cls(config=ModelConfig(**{k: v for k, v in spot.items() if k in _MODEL_FIELDS}),
                   costs={k: v for k, v in spot.items() if k not in _MODEL_FIELDS and k not in _OWN_KEYS},
                   tokens=float(spot["tokens"]), predicted_loss=float(spot["predicted_loss"]),
                   interval=(float(iv[0]), float(iv[1])) if iv else None,
                   interval_level=spot.get("interval_level"), interval_note=spot.get("interval_note"),
                   within_budget=spot.get("within_budget"), budget_use=spot.get("budget_use"))


@dataclass(frozen=True, eq=True)
class FrontierPoint(_ReadsAsDict):
    """One point of a loss-vs-cost frontier, with the search's own (exact, affine) costs:
    ``costs`` holds params_total, params_active, weight_bytes, kv_cache_bytes, total_bytes and
    flops_per_token_forward; ``decode_ms_per_token`` is None without a device."""

    config: ModelConfig
    costs: Mapping[str, float]
    tokens: float
    predicted_loss: float
    within_budget: bool
    decode_ms_per_token: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """One ``frontier`` row of ``moe-fit --json``."""
        c = self.config
        row = {"d_model": c.d_model, "n_layers": c.n_layers, "head_dim": c.head_dim,
               "n_kv_heads": c.n_kv_heads, "n_experts": c.n_experts, "top_k": c.top_k,
               "granularity": c.granularity, "n_shared": c.n_shared, "expansion": c.expansion,
               "is_moe": c.is_moe, **self.costs, "tokens": self.tokens,
               "predicted_loss": self.predicted_loss, "within_budget": self.within_budget}
        if self.decode_ms_per_token is not None:
            row["decode_ms_per_token"] = self.decode_ms_per_token
        return row


def _interval(model: LossModel, X: dict[str, np.ndarray], level: float) -> tuple[tuple | None, str | None]:
    fn = getattr(model, "predict_interval", None)
    if fn is None or getattr(model, "has_samples", True) is False:
        return None, ("no interval: the fit has no bootstrap samples (published coefficients); "
                      "refit runs with a bootstrap for one")
    try:
        lo, hi = fn(X, level=level)
    except Exception as err:  # noqa: BLE001 - an interval is optional; say why there is none
        return None, f"no interval: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return (float(np.asarray(lo).ravel()[0]), float(np.asarray(hi).ravel()[0])), None


def describe(model: LossModel, cfg: ModelConfig, budget: Budget, *, level: float = 0.9) -> Candidate:
    """``cfg`` on the budget's cost axes: exact costs (one :func:`cost_summary` call), training
    tokens (``budget.tokens``, or ``budget.train_compute`` by ``budget.compute_rule``), predicted
    loss and its bootstrap interval, and the share of each budget it uses."""
    s = cost_summary(cfg, weights=budget.weights, kv=budget.kv, context=budget.context,
                     device=budget.device, embeddings=budget.embeddings)
    if budget.tokens is not None:
        tokens = float(budget.tokens)
    elif budget.compute_rule == "6N":
        tokens = budget.train_compute / (6.0 * s["params_non_embedding_active"])
    else:
        tokens = budget.train_compute / s["flops_per_token_training"]
    X = config_columns([cfg], [tokens])
    loss = float(np.asarray(model.predict(X), dtype=np.float64)[0])
    interval, note = _interval(model, X, level)
    fits = {"memory": s["total_bytes"] <= budget.memory}
    use = {"memory": s["total_bytes"] / budget.memory}
    if budget.flops_per_token is not None:
        fits["flops_per_token"] = s["flops_per_token_forward"] <= budget.flops_per_token
        use["flops_per_token"] = s["flops_per_token_forward"] / budget.flops_per_token
    if budget.latency_ms is not None:
        fits["latency_ms"] = s["decode_ms_per_token"] <= budget.latency_ms
        use["latency_ms"] = s["decode_ms_per_token"] / budget.latency_ms
    return Candidate(config=cfg, costs=s, tokens=tokens, predicted_loss=loss, interval=interval,
                     interval_level=level if interval else None, interval_note=note,
                     within_budget=all(fits.values()), budget_use=use)
