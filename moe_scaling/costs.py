"""The on-device cost model: parameters, FLOPs, bytes and roofline latency of a :class:`ModelConfig`.

Conventions (DESIGN.md section 3):

* **Parameter counts** include every weight: embeddings, attention (and its biases), QK-norm and
  RMSNorm gains, the router, routed and shared experts, shared-expert gates. Tied input/output
  embeddings count once. ``active`` counts what one token touches: every non-FFN weight, the
  dense FFNs, the router, ``top_k`` routed experts and all shared experts per MoE layer, and the
  embedding matrix (once when tied, both matrices when untied). The router's selection bias of
  sigmoid routers (``router_bias``) is a buffer, not a parameter, and is not counted.
* **FLOPs per token** (forward): ``2 x`` active non-embedding matmul weights (router excluded) +
  router ``2 d n_experts`` per MoE layer + attention scores and values
  ``2 * 2 * n_layers * context * n_heads * head_dim`` (halved for causal attention, i.e. the
  average over a ``context``-token sequence) + LM head ``2 d V``. Training is ``3 x`` forward.
* **Bytes on device**: each weight class at its own :class:`Precision`; an integer scheme with group
  size ``g`` and ``s``-bit scales costs ``bits + s / g`` bits per weight (INT4, g=32, fp16 scales =
  4.5 bits). KV cache: ``2 * n_layers * n_kv_heads * head_dim * context`` values; an integer KV
  format adds one fp16 scale per head and token.
* **Roofline latency** on a :class:`DeviceProfile`: decode ms/token = ``max(bytes read / B, FLOPs / P)``
  with bytes read = active weight bytes + KV bytes at the context; prefill of ``T`` tokens =
  ``max(touched weight bytes / B, T * FLOPs / P)``, where an expert is touched by a ``T``-token
  prompt with probability ``1 - (1 - k/E)^T`` (uniform routing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moe_scaling.config import ConfigError, ModelConfig

__all__ = [
    "ParamCounts", "param_counts", "flops_per_token", "Precision", "parse_precision",
    "weight_bytes", "kv_cache_bytes", "parse_bytes", "parse_count", "DeviceProfile", "load_device",
    "list_devices", "roofline", "cost_summary", "PublishedModel", "published_models",
]


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model; see the module docstring for what each includes."""

    total: int
    active: int
    embedding: int          # input embedding + untied output head (once when tied)
    attention: int          # all layers: q/k/v/o (+ biases, QK-norm gains)
    norms: int              # RMSNorm gains (block and final norms)
    dense_ffn: int          # all dense FFN layers
    router: int             # all MoE layers
    routed_experts: int     # all routed experts of all MoE layers
    routed_active: int      # top_k routed experts per MoE layer, summed over layers
    shared_experts: int     # shared experts + their gates, all MoE layers

    @property
    def non_embedding_total(self) -> int:
        return self.total - self.embedding

    @property
    def non_embedding_active(self) -> int:
        return self.active - self.embedding


def _swiglu(d_model: int, width: int) -> int:
    return 3 * d_model * width


def _attention_matmul(cfg: ModelConfig) -> int:
    """q, k, v, o projection weights of one layer."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.d_model * q + 2 * cfg.d_model * kv


def _attention_vectors(cfg: ModelConfig) -> int:
    """q/k/v biases and QK-norm gains of one layer (per-head-dim gains, shared over heads)."""
    n = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim if cfg.attn_bias else 0
    return n + (2 * cfg.head_dim if cfg.qk_norm else 0)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count the parameters of ``cfg`` exactly (see the module docstring for conventions)."""
    L, d = cfg.n_layers, cfg.d_model
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    attention = L * (_attention_matmul(cfg) + _attention_vectors(cfg))
    norms = 2 * L * d + d
    n_moe = cfg.n_moe_layers
    dense_ffn = (L - n_moe) * _swiglu(d, cfg.d_ff)
    router = n_moe * d * cfg.n_experts
    routed = n_moe * cfg.n_experts * _swiglu(d, cfg.d_expert)
    routed_active = n_moe * cfg.top_k * _swiglu(d, cfg.d_expert)
    shared = n_moe * cfg.n_shared * (_swiglu(d, cfg.d_shared) + (d if cfg.shared_gate else 0))
    common = embedding + attention + norms + dense_ffn + router + shared
    return ParamCounts(total=common + routed, active=common + routed_active, embedding=embedding,
                       attention=attention, norms=norms, dense_ffn=dense_ffn, router=router,
                       routed_experts=routed, routed_active=routed_active, shared_experts=shared)


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def flops_per_token(cfg: ModelConfig, context: int | None = None, *, training: bool = False,
                    causal: bool = True) -> float:
    """FLOPs per token of the forward pass (``training=True``: forward + backward = 3x forward).

    ``context`` is the sequence length (default ``cfg.max_seq_len``); with ``causal`` the attention
    term is averaged over the positions of a ``context``-token sequence (halved).
    """
    context = cfg.max_seq_len if context is None else context
    p = param_counts(cfg)
    # Matmul weights a token multiplies: attention projections, FFNs, shared experts (and their
    # d_model x 1 gates). Norm gains and biases are not matmuls; the router is counted on its own.
    matmul_active = (cfg.n_layers * _attention_matmul(cfg) + p.dense_ffn + p.routed_active
                     + p.shared_experts)
    router = 2 * cfg.d_model * cfg.n_experts * cfg.n_moe_layers
    attention = 2 * 2 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim * (0.5 if causal else 1.0)
    lm_head = 2 * cfg.d_model * cfg.vocab_size
    forward = 2 * matmul_active + router + attention + lm_head
    return 3.0 * forward if training else float(forward)


# --------------------------------------------------------------------------------------
# Precisions and bytes
# --------------------------------------------------------------------------------------

_FLOAT_BITS = {"fp32": 32, "f32": 32, "float32": 32, "bf16": 16, "bfloat16": 16, "fp16": 16,
               "f16": 16, "float16": 16, "fp8": 8}
_PRECISION_RE = re.compile(r"^int(?P<bits>[2-8])(?:-g(?P<group>\d+))?(?:-(?P<scale>fp16|bf16|fp32|fp8))?$")


@dataclass(frozen=True)
class Precision:
    """A weight storage format: ``bits`` per value plus one ``scale_bits`` scale per ``group_size``
    values (``group_size=None``: no scales, a float format)."""

    name: str
    bits: int
    group_size: int | None = None
    scale_bits: int = 16

    @property
    def bits_per_value(self) -> float:
        return self.bits + (self.scale_bits / self.group_size if self.group_size else 0.0)


def parse_precision(spec: str, *, field: str = "weights") -> Precision:
    """Parse ``bf16``, ``fp16``, ``fp32``, ``fp8``, ``int8``, ``int4``, ``int4-g64``, ``int4-g32-bf16``.

    Integer formats default to group size 32 with fp16 scales (INT4 -> 4.5 bits per weight).
    """
    s = str(spec).strip().lower()
    if s in _FLOAT_BITS:
        return Precision(s, _FLOAT_BITS[s])
    m = _PRECISION_RE.match(s)
    if not m:
        raise ConfigError(f"{field} = {spec!r}: unknown precision; use bf16, fp16, fp32, fp8, int8, "
                          "int4 or intN-gG[-fp16|bf16|fp32] (e.g. int4-g64)")
    group = int(m["group"]) if m["group"] else 32
    if group < 1:
        raise ConfigError(f"{field} = {spec!r}: group size must be >= 1; e.g. int4-g32")
    scale = _FLOAT_BITS[m["scale"]] if m["scale"] else 16
    return Precision(s, int(m["bits"]), group, scale)


def weight_bytes(cfg: ModelConfig, weights: str | Precision = "int4", *,
                 embeddings: str | Precision | None = None, router: str | Precision = "bf16",
                 norms: str | Precision = "bf16", active_only: bool = False) -> float:
    """Bytes of the model's weights on device.

    ``weights`` is the precision of every matmul weight outside the embeddings and router;
    ``embeddings`` defaults to ``weights``; the router and the norm gains/biases default to bf16.
    ``active_only`` counts what one decoded token reads: active non-embedding weights plus the
    output head (the ``V x d`` matrix), not the input embedding table (one row is read).
    """
    w = weights if isinstance(weights, Precision) else parse_precision(weights)
    e = w if embeddings is None else (embeddings if isinstance(embeddings, Precision)
                                      else parse_precision(embeddings, field="embeddings"))
    r = router if isinstance(router, Precision) else parse_precision(router, field="router")
    n = norms if isinstance(norms, Precision) else parse_precision(norms, field="norms")
    p = param_counts(cfg)
    small = p.norms + cfg.n_layers * _attention_vectors(cfg)
    attention_matmul = cfg.n_layers * _attention_matmul(cfg)
    ffn = p.dense_ffn + p.shared_experts + (p.routed_active if active_only else p.routed_experts)
    if active_only:
        emb = cfg.vocab_size * cfg.d_model  # the output head is read in full for each token
    else:
        emb = p.embedding
    bits = ((attention_matmul + ffn) * w.bits_per_value + emb * e.bits_per_value
            + p.router * r.bits_per_value + small * n.bits_per_value)
    return bits / 8.0


def kv_cache_bytes(cfg: ModelConfig, context: int, kv: str | Precision = "bf16") -> float:
    """KV cache bytes for one sequence of ``context`` tokens:
    ``2 * n_layers * n_kv_heads * head_dim * context * bits / 8``; integer formats add one fp16
    scale per (layer, K/V, head, token)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConfigError(f"context = {context!r}: must be a whole number >= 1; e.g. --context 4096")
    p = kv if isinstance(kv, Precision) else parse_precision(kv, field="kv")
    values = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context
    scales = 2 * cfg.n_layers * cfg.n_kv_heads * context if p.group_size else 0
    return (values * p.bits + scales * p.scale_bits) / 8.0


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_BYTES_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*"
                       r"(?P<unit>[KMGT]i?B|B)?\s*$")


def parse_bytes(text: str | int, *, field: str = "budget") -> int:
    """Parse a memory size exactly: ``2GB`` (1e9), ``1.5GiB`` (2^30), ``800MB``, ``2e9``, ``512 MiB``.

    Units are case-sensitive (``gb`` is refused: it reads as gigabits). The result must be a whole,
    positive number of bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = Decimal(text)
    else:
        m = _BYTES_RE.match(str(text))
        if not m:
            raise ConfigError(f"{field} = {text!r}: not a memory size; write e.g. 2GB, 1.5GiB, 800MB or 2e9")
        try:
            value = Decimal(m["num"]) * _UNITS[m["unit"] or ""]
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            raise ConfigError(f"{field} = {text!r}: not a number; write e.g. 2GB") from None
    if value <= 0 or value != value.to_integral_value():
        raise ConfigError(f"{field} = {text!r}: must be a positive whole number of bytes; e.g. 2GB")
    return int(value)


_COUNT_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*(?P<unit>[KMBT])?\s*$")
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_count(text: str | int | float, *, field: str = "count") -> float:
    """Parse a count such as ``0.9B`` (parameters), ``1e12`` or ``300M`` (K/M/B/T = 1e3..1e12)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _COUNT_RE.match(str(text))
        if not m:
            raise ConfigError(f"{field} = {text!r}: not a count; write e.g. 0.9B, 300M or 1e12")
        value = float(Decimal(m["num"]) * _COUNT_UNITS[m["unit"] or ""])
    if not value > 0:
        raise ConfigError(f"{field} = {text!r}: must be positive; e.g. 0.9B")
    return value


# --------------------------------------------------------------------------------------
# Devices and roofline latency
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """A device for roofline latency: peak memory bandwidth (bytes/s) and peak ops/s."""

    name: str
    description: str
    memory_bandwidth: float   # bytes/s
    peak_ops: float           # ops/s at the precision the weights run in
    memory: float | None = None  # bytes of RAM, for reference


def _devices_file() -> Path:
    return Path(str(resources.files("moe_scaling") / "resources" / "devices.yaml"))


def list_devices() -> dict[str, DeviceProfile]:
    """Every shipped device profile (moe_scaling/resources/devices.yaml), by name."""
    raw = yaml.safe_load(_devices_file().read_text())
    return {name: DeviceProfile(name=name, description=d["description"],
                                memory_bandwidth=float(d["memory_bandwidth"]),
                                peak_ops=float(d["peak_ops"]),
                                memory=float(d["memory"]) if d.get("memory") else None)
            for name, d in raw["devices"].items()}


def load_device(name: str | DeviceProfile) -> DeviceProfile:
    """A shipped profile by name (see :func:`list_devices`), or a path to a YAML with the same fields."""
    if isinstance(name, DeviceProfile):
        return name
    devices = list_devices()
    if name in devices:
        return devices[name]
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        d = yaml.safe_load(path.read_text()) or {}
        try:
            return DeviceProfile(name=d.get("name", path.stem), description=d.get("description", ""),
                                 memory_bandwidth=float(d["memory_bandwidth"]), peak_ops=float(d["peak_ops"]),
                                 memory=float(d["memory"]) if d.get("memory") else None)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"device = {name!r}: needs numeric memory_bandwidth and peak_ops ({err})") from None
    raise ConfigError(f"device = {name!r}: unknown; use one of {', '.join(sorted(devices))} or a YAML file")


def roofline(cfg: ModelConfig, device: str | DeviceProfile, *, weights: str = "int4",
             kv: str = "int8", context: int = 4096, prompt: int | None = None,
             embeddings: str | None = None) -> dict[str, float]:
    """Roofline latency (see the module docstring). Returns ``decode_ms_per_token``, ``prefill_ms``
    (for a ``prompt``-token prompt, default ``context``) and which bound binds each."""
    dev = load_device(device)
    prompt = context if prompt is None else prompt
    read = weight_bytes(cfg, weights, embeddings=embeddings, active_only=True) \
        + kv_cache_bytes(cfg, context, kv)
    decode_mem = read / dev.memory_bandwidth
    decode_compute = flops_per_token(cfg, context) / dev.peak_ops
    # prefill: each routed expert is touched with probability 1 - (1 - k/E)^T
    full = weight_bytes(cfg, weights, embeddings=embeddings)
    if cfg.is_moe:
        w = parse_precision(weights)
        routed_bytes = param_counts(cfg).routed_experts * w.bits_per_value / 8
        touched = 1.0 - (1.0 - cfg.top_k / cfg.n_experts) ** prompt
        full -= routed_bytes * (1.0 - touched)
    prefill_mem = full / dev.memory_bandwidth
    prefill_compute = prompt * flops_per_token(cfg, prompt) / dev.peak_ops
    return {
        "decode_ms_per_token": 1e3 * max(decode_mem, decode_compute),
        "decode_bound": "memory" if decode_mem >= decode_compute else "compute",
        "prefill_ms": 1e3 * max(prefill_mem, prefill_compute),
        "prefill_bound": "memory" if prefill_mem >= prefill_compute else "compute",
        "prompt_tokens": prompt,
    }


def cost_summary(cfg: ModelConfig, *, weights: str = "int4", kv: str = "int8", context: int = 4096,
                 device: str | None = None, embeddings: str | None = None,
                 prompt: int | None = None) -> dict[str, Any]:
    """Everything ``moe-cost`` reports, as one flat dict of plain numbers."""
    p = param_counts(cfg)
    wb = weight_bytes(cfg, weights, embeddings=embeddings)
    kvb = kv_cache_bytes(cfg, context, kv)
    out: dict[str, Any] = {
        "params_total": p.total, "params_active": p.active, "params_embedding": p.embedding,
        "params_non_embedding_total": p.non_embedding_total,
        "params_non_embedding_active": p.non_embedding_active,
        "flops_per_token_forward": flops_per_token(cfg, context),
        "flops_per_token_training": flops_per_token(cfg, context, training=True),
        "weights": weights, "kv": kv, "context": context,
        "weight_bytes": wb, "kv_cache_bytes": kvb, "total_bytes": wb + kvb,
        "n_experts": cfg.n_experts, "top_k": cfg.top_k, "granularity": cfg.granularity,
        "expansion": cfg.expansion, "sparsity": cfg.sparsity, "activation_ratio": cfg.activation_ratio,
    }
    if device is not None:
        out["device"] = load_device(device).name
        out.update(roofline(cfg, device, weights=weights, kv=kv, context=context, prompt=prompt,
                            embeddings=embeddings))
    return out


# --------------------------------------------------------------------------------------
# Published models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedModel:
    """A published MoE: its config (None where only counts were published) and published counts."""

    name: str
    source: str
    params_total: float
    params_active: float
    config: ModelConfig | None


def published_models() -> dict[str, PublishedModel]:
    """The published models shipped in moe_scaling/resources/published_models.yaml, by name."""
    raw = yaml.safe_load((_devices_file().parent / "published_models.yaml").read_text())
    return {name: PublishedModel(name=name, source=d["source"],
                                 params_total=float(d["published"]["params_total"]),
                                 params_active=float(d["published"]["params_active"]),
                                 config=ModelConfig.from_dict(d["model"]) if d.get("model") else None)
            for name, d in raw.items()}
