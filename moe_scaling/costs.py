"""The on-device cost model: parameters, FLOPs, bytes and roofline latency of a :class:`ModelConfig`.

Conventions (docs/design.md, section 3):

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
* **Roofline latency** on a :class:`DeviceProfile`: decode ms/token =
  ``max(bytes read / B, (FLOPs - F_e) / P_1 + F_e / P_e) + L t_layer`` with bytes read = active weight
  bytes + KV bytes at the context and ``F_e`` the FLOPs of the token's routed experts; prefill of ``T``
  tokens = ``max(touched weight bytes / B, T * FLOPs / P) + L t_layer``,
  where an expert is touched by a ``T``-token prompt with probability ``1 - (1 - k/E)^T`` (uniform
  routing). ``P`` is the peak of the runtime's matrix-matrix kernel, ``P_1`` what its batch-1 kernel
  reaches on large matrices (unpacking INT4 weights for one token is not free: ~0.6 of ``P`` on our CPU
  runtime), ``P_e`` what it reaches on one token's small expert matrices (~0.2 of ``P`` there: a
  fixed cost per expert matrix that small matrices do not amortise), and ``L * t_layer`` is what
  running the layers costs beyond their weights (norms, attention bookkeeping, kernel launches). A
  profile without ``P_1``, ``P_e`` and ``t_layer`` (the shipped vendor profiles) gives the plain
  roofline; measured on our 2-core CPU in bench/README.md ("device latency").
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.units import Precision, parse_precision

__all__ = [
    "ParamCounts", "param_counts", "flops_per_token", "Precision", "parse_precision",
    "weight_bytes", "RUNTIME_STORAGE", "stored_bytes", "kv_cache_bytes", "DeviceProfile", "load_device",
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


RUNTIME_STORAGE: dict[str, dict[str, str]] = {
    # moe-export --runtime onnx (moe_scaling/ondevice/onnx_graph.py): MatMulNBits / QMoE operands in
    # INT4 groups of 32 with fp16 scales; the embedding (and an untied head), router, shared-expert
    # gates, norms and biases in float32; RoPE tables of max_positions x head_dim / 2, cos and sin.
    "onnxruntime": {"weights": "int4", "embeddings": "fp32", "router": "fp32", "norms": "fp32",
                    "rope": "fp32"},
}
"""What each runtime we export to stores, per weight class (``stored_bytes``)."""


def stored_bytes(cfg: ModelConfig, runtime: str = "onnxruntime", *, max_positions: int | None = None) -> float:
    """Bytes of ``cfg``'s weights as ``runtime`` stores them in its model file (not counting the
    file format's own few kilobytes): :func:`weight_bytes` at the runtime's precisions plus its
    RoPE tables for ``max_positions`` (default ``cfg.max_seq_len``)."""
    if runtime not in RUNTIME_STORAGE:
        raise ConfigError(f"runtime = {runtime!r}: unknown; use one of {', '.join(RUNTIME_STORAGE)}")
    s = RUNTIME_STORAGE[runtime]
    positions = cfg.max_seq_len if max_positions is None else max_positions
    rope = 2 * positions * (cfg.head_dim // 2) * parse_precision(s["rope"]).bits_per_value / 8.0
    return weight_bytes(cfg, s["weights"], embeddings=s["embeddings"], router=s["router"],
                        norms=s["norms"]) + rope


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
    matvec_ops: float | None = None  # ops/s of the batch-1 (decode) kernel; None: peak_ops
    layer_overhead_s: float = 0.0    # fixed seconds per layer per forward call (launches, norms, attention)
    expert_matvec_ops: float | None = None  # ops/s of one token's routed experts; None: matvec_ops

    @classmethod
    def from_mapping(cls, name: str, d: dict) -> "DeviceProfile":
        """A profile from YAML fields (numbers may be strings such as ``76.8e9``)."""
        opt = lambda key: float(d[key]) if d.get(key) is not None else None
        return cls(name=name, description=d.get("description", ""), memory_bandwidth=float(d["memory_bandwidth"]),
                   peak_ops=float(d["peak_ops"]), memory=opt("memory"), matvec_ops=opt("matvec_ops"),
                   layer_overhead_s=opt("layer_overhead_s") or 0.0, expert_matvec_ops=opt("expert_matvec_ops"))


def _devices_file() -> Path:
    return Path(str(resources.files("moe_scaling") / "resources" / "devices.yaml"))


def list_devices() -> dict[str, DeviceProfile]:
    """Every shipped device profile (moe_scaling/resources/devices.yaml), by name."""
    raw = yaml.safe_load(_devices_file().read_text())
    return {name: DeviceProfile.from_mapping(name, d) for name, d in raw["devices"].items()}


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
            return DeviceProfile.from_mapping(d.get("name", path.stem), d)
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
    matvec = dev.matvec_ops or dev.peak_ops
    routed = 2.0 * param_counts(cfg).routed_active          # one token's routed-expert matmul FLOPs
    decode_compute = (flops_per_token(cfg, context) - routed) / matvec + routed / (dev.expert_matvec_ops or matvec)
    overhead = cfg.n_layers * dev.layer_overhead_s
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
        "decode_ms_per_token": 1e3 * (max(decode_mem, decode_compute) + overhead),
        "decode_bound": "memory" if decode_mem >= decode_compute else "compute",
        "prefill_ms": 1e3 * (max(prefill_mem, prefill_compute) + overhead),
        "prefill_bound": "memory" if prefill_mem >= prefill_compute else "compute",
        "overhead_ms": 1e3 * overhead,
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
