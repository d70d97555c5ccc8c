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
* **Latency** on a :class:`DeviceProfile` (:func:`latency_terms`; :func:`roofline` reports decode
  and prefill): one forward call over ``T`` new tokens after ``P`` cached ones takes
  ``max(memory, compute) + fixed`` with

      memory  = B_m / memory_bandwidth + B_e / expert_bandwidth + B_kv / kv_bandwidth
      compute = F_m / peak_ops + F_e / expert_gemm_ops + F_att / attention_ops
      fixed   = run_s + n_mat matrix_call_s + L_moe (moe_call_s + u c_e) + L attention_call_s + n_op op_s

  ``B_e`` the bytes of the routed experts the call touches (``u`` per MoE layer: ``top_k`` for one
  token, ``E (1 - (1 - k/E)^T)`` for ``T`` tokens under uniform routing), ``B_m`` every other weight
  byte it reads (all but the untouched experts; one token reads the output head but one embedding row),
  ``B_kv`` the cache of ``P`` positions; ``F_m`` the FLOPs of matrices, head and router, ``F_e`` those of
  the routed experts, ``F_att = 4 L h hd (T P + T^2 / 2)``; ``n_mat`` and ``n_op`` the MatMulNBits
  calls and the other small nodes of the exported graph (:func:`matrix_calls`, :func:`small_ops`),
  ``c_e = expert_call_s`` for one token and ``expert_gemm_call_s`` for several. On a profile measured on
  ``n > 1`` threads a prompt's ``F_e`` is scaled by :func:`routed_imbalance`: ONNX Runtime's QMoE gives
  whole experts to threads, so a skewed routing (a random router's, or a prompt's) leaves threads idle
  (1 under uniform routing when ``n`` divides ``E``). A vendor profile gives
  ``memory_bandwidth`` and ``peak_ops`` only: the plain roofline ``max(bytes / B, FLOPs / P)``. A
  measured profile (``moe-cost --profile-host``, cached as ``this-host``) sets every field from
  single-kernel micro-benchmarks of ONNX Runtime (moe_scaling/ondevice/calibrate.py); validated out of
  sample on exported models in bench/README.md ("latency model").


One module (~575 lines): counts, bytes, FLOPs and latency all read one :class:`ModelConfig` through
the same per-layer counts, and the latency model needs the other three. The seam, if it grows: the
device side (:class:`DeviceProfile`, its cache, :func:`latency_terms`, :func:`roofline`) into its own
module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.units import Precision, parse_precision

__all__ = [
    "ParamCounts", "param_counts", "flops_per_token", "Precision", "parse_precision",
    "weight_bytes", "RUNTIME_STORAGE", "stored_bytes", "kv_cache_bytes", "DeviceProfile", "load_device",
    "list_devices", "roofline", "latency_terms", "LatencyTerms", "routed_imbalance", "small_ops", "matrix_calls",
    "HOST", "host_cache_dir", "save_host_profile", "cost_summary", "PublishedModel", "published_models",
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
    """A device for latency: the roofline's bandwidth and peak, plus (measured profiles) the fixed
    cost of each kind of kernel call and the rate of each kernel class (module docstring).

    Vendor profiles give ``memory_bandwidth`` and ``peak_ops`` only: the plain roofline. A measured
    profile (:func:`moe_scaling.ondevice.calibrate.measure_profile`, ``moe-cost --profile-host``) sets
    every field from a single-kernel micro-benchmark of ONNX Runtime's CPU kernels:

    ========================  ===================================================================
    ``memory_bandwidth``      bytes/s: slope of batch-1 MatMulNBits time over its INT4 bytes
    ``peak_ops``              ops/s: slope of MatMulNBits time over FLOPs at 128 rows
    ``matrix_call_s``         s: intercept of the batch-1 MatMulNBits fit (one call per matrix)
    ``moe_call_s``            s: intercept of the one-token QMoE fit (one call per MoE layer)
    ``expert_call_s``         s: QMoE time per routed expert a token uses, beyond its bytes
    ``expert_bandwidth``      bytes/s: slope of one-token QMoE time over the routed experts' bytes
    ``expert_gemm_call_s``    s: QMoE on 128 tokens, fixed cost per expert the tokens touch
    ``expert_gemm_ops``       ops/s: QMoE on 128 tokens, FLOPs over time beyond its fixed costs
    ``run_s``                 s: one session run (intercept of the GroupQueryAttention fit)
    ``attention_call_s``      s: one decode attention call with its cache in and out
    ``kv_bandwidth``          bytes/s: slope of decode attention time over the cache's bytes
    ``attention_ops``         ops/s: causal prefill attention FLOPs over its time
    ``op_s``                  s: one small node (norm, reshape, split, activation) on one token
    ========================  ===================================================================
    """

    name: str
    description: str
    memory_bandwidth: float   # bytes/s
    peak_ops: float           # ops/s at the precision the weights run in
    memory: float | None = None  # bytes of RAM, for reference
    threads: int | None = None   # the thread count a measured profile was measured at (routed_imbalance reads it)
    matrix_call_s: float = 0.0
    moe_call_s: float = 0.0
    expert_call_s: float = 0.0
    expert_bandwidth: float | None = None   # None: memory_bandwidth
    expert_gemm_ops: float | None = None    # None: peak_ops
    expert_gemm_call_s: float = 0.0
    run_s: float = 0.0
    attention_call_s: float = 0.0
    kv_bandwidth: float | None = None       # None: memory_bandwidth
    attention_ops: float | None = None      # None: peak_ops
    op_s: float = 0.0

    RATES = ("memory_bandwidth", "peak_ops", "expert_bandwidth", "expert_gemm_ops", "kv_bandwidth", "attention_ops")
    SECONDS = ("matrix_call_s", "moe_call_s", "expert_call_s", "expert_gemm_call_s", "run_s", "attention_call_s",
               "op_s")

    def __post_init__(self):
        for key in self.RATES:
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"device {self.name}: {key} = {v!r}: must be a positive number of per-second "
                                  "units; re-measure with moe-cost --profile-host or fix the YAML")
        for key in self.SECONDS:
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"device {self.name}: {key} = {v!r}: must be seconds >= 0; re-measure with "
                                  "moe-cost --profile-host or fix the YAML")

    @classmethod
    def from_mapping(cls, name: str, d: dict) -> "DeviceProfile":
        """A profile from YAML fields (numbers may be strings such as ``76.8e9``)."""
        known = {f.name for f in fields(cls)} - {"name", "description"}
        unknown = sorted(set(d) - known - {"name", "description"})
        if unknown:
            raise ConfigError(f"device {name}: unknown field(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        kw: dict[str, Any] = {}
        for key in known:
            if d.get(key) is not None:
                kw[key] = int(d[key]) if key == "threads" else float(d[key])
        return cls(name=name, description=d.get("description", ""), **kw)

    def to_mapping(self) -> dict[str, Any]:
        """The YAML fields of this profile (``from_mapping``'s inverse)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _devices_file() -> Path:
    return Path(str(resources.files("moe_scaling") / "resources" / "devices.yaml"))


def list_devices() -> dict[str, DeviceProfile]:
    """Every shipped device profile (moe_scaling/resources/devices.yaml), by name."""
    raw = yaml.safe_load(_devices_file().read_text())
    return {name: DeviceProfile.from_mapping(name, d) for name, d in raw["devices"].items()}


HOST = "this-host"
"""The device name of this machine's measured profile (``moe-cost --profile-host``), cached per
thread count: ``this-host`` is the last one measured, ``this-host-1t``, ``this-host-2t``, ... each."""


def host_cache_dir() -> Path:
    """Where measured host profiles are cached: ``$MOE_SCALING_CACHE/devices`` (default
    ``~/.cache/moe_scaling/devices``)."""
    root = os.environ.get("MOE_SCALING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe_scaling")
    return Path(root) / "devices"


def save_host_profile(profile: DeviceProfile) -> list[Path]:
    """Cache a measured profile as ``this-host.yaml`` and ``this-host-{threads}t.yaml``; returns the paths."""
    if profile.threads is None:
        raise ConfigError(f"device {profile.name}: threads = None; a host profile records the thread count it "
                          "was measured at (moe_scaling.ondevice.calibrate.measure_profile)")
    folder = host_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in (HOST, f"{HOST}-{profile.threads}t"):
        body = {**profile.to_mapping(), "name": name}
        path = folder / f"{name}.yaml"
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(body, sort_keys=False))
        tmp.replace(path)
        paths.append(path)
    return paths


def load_device(name: str | DeviceProfile) -> DeviceProfile:
    """A shipped profile by name (see :func:`list_devices`), ``this-host`` / ``this-host-{N}t`` (the
    cached measured profile, :func:`save_host_profile`), or a path to a YAML with the same fields."""
    if isinstance(name, DeviceProfile):
        return name
    devices = list_devices()
    if name in devices:
        return devices[name]
    if name == HOST or (name.startswith(HOST + "-") and name.endswith("t")):
        path = host_cache_dir() / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"device = {name!r}: no measured profile at {path}; measure it with "
                              "moe-cost --profile-host [--threads N] (about a minute)")
        return DeviceProfile.from_mapping(name, yaml.safe_load(path.read_text()) or {})
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        d = yaml.safe_load(path.read_text()) or {}
        try:
            return DeviceProfile.from_mapping(d.get("name", path.stem), d)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"device = {name!r}: needs numeric memory_bandwidth and peak_ops ({err})") from None
    raise ConfigError(f"device = {name!r}: unknown; use one of {', '.join(sorted(devices))}, {HOST} "
                      "(moe-cost --profile-host) or a YAML file")


def small_ops(cfg: ModelConfig) -> int:
    """Nodes of the exported decoder (moe_scaling.ondevice.onnx_graph, after ONNX Runtime's graph
    optimisation) other than its MatMulNBits, QMoE and GroupQueryAttention calls: per layer two norms,
    with QK-norm two more norms, four reshapes and a split (an attention bias fuses into the
    q|k|v MatMulNBits); per SwiGLU
    (dense FFN or shared experts) a split, the fused SiLU and a multiply, with a shared-expert gate six
    more (matmul, sigmoid, unsqueeze, two reshapes, multiply); per MoE layer the router's matmul,
    reshape and softmax/sigmoid (an add with a selection bias) and with shared experts the add of the
    two outputs; once: the final norm, the head's Gemm and reshape, and ten nodes of position bookkeeping
    (shape, gather, add, sub, cast, reshape) and the embedding gather. Counted against the optimised
    graph in tests/test_latency.py."""
    per_layer = 2 + (7 if cfg.qk_norm else 0)           # an attention bias fuses into its MatMulNBits
    swiglu = 3
    n_moe = cfg.n_moe_layers
    n = cfg.n_layers * per_layer + (cfg.n_layers - n_moe) * swiglu
    if n_moe:
        moe = 3 + (1 if cfg.router_bias else 0)
        if cfg.n_shared:
            moe += swiglu + 1 + (6 if cfg.shared_gate else 0)
        n += n_moe * moe
    return n + 13


def matrix_calls(cfg: ModelConfig) -> int:
    """MatMulNBits calls of one forward pass: q|k|v and o per layer, gate|up and down per dense FFN
    layer and per MoE layer with shared experts (all shared experts in one pair)."""
    return 2 * cfg.n_layers + 2 * (cfg.n_layers - cfg.n_moe_layers) + (2 * cfg.n_moe_layers if cfg.n_shared else 0)


@dataclass(frozen=True)
class LatencyTerms:
    """One forward call's time split as :func:`latency_terms` computes it (seconds)."""

    memory_s: float       # bytes over the bandwidth each byte class moves at
    compute_s: float      # FLOPs over the rate each kernel class reaches
    fixed_s: float        # fixed costs per call: run, matrices, MoE layers, experts, attention, small ops

    @property
    def total_s(self) -> float:
        return max(self.memory_s, self.compute_s) + self.fixed_s

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def routed_imbalance(cfg: ModelConfig, threads: int | None,
                     expert_load: Sequence[float] | Sequence[Sequence[float]] | None = None) -> float:
    """How much longer a multi-token call's routed experts take than with their work spread evenly
    over ``threads``, under ONNX Runtime's QMoE schedule: the active experts, sorted by token count,
    go round-robin to ``min(active, threads)`` threads, each thread running its experts one after
    another; with fewer active experts than threads one expert runs at a time on all of them. A layer
    whose experts take shares ``s_(1) >= s_(2) >= ...`` of its token-slots then runs
    ``threads * max_j sum_{i = j mod threads} s_(i)`` times its balanced time (1 when fewer experts
    than threads are active); the factor is the mean over MoE layers (each has the same FLOPs).

    ``expert_load``: each expert's share of the token-slots, one row of ``n_experts`` values for
    every MoE layer or one row for all; None: uniform routing. A property of the model and its input
    (random or trained routers), not of the device; 1 on one thread."""
    n = max(int(threads or 1), 1)
    if not cfg.is_moe or n == 1:
        return 1.0
    if expert_load is None:
        rows = [[1.0 / cfg.n_experts] * cfg.n_experts]
    else:
        rows = [list(expert_load)] if all(isinstance(v, (int, float)) for v in expert_load) else \
            [list(r) for r in expert_load]
    if (len(rows) not in (1, cfg.n_moe_layers) or any(len(r) != cfg.n_experts for r in rows)
            or any(not (v >= 0.0) for r in rows for v in r) or any(sum(r) <= 0 for r in rows)):
        raise ConfigError(f"expert_load: {len(rows)} row(s) of shares; give one row of {cfg.n_experts} shares "
                          f"(>= 0, not all 0) per MoE layer ({cfg.n_moe_layers}) or one row for all")
    factors = []
    for row in rows:
        shares = sorted((v / sum(row) for v in row if v > 0), reverse=True)
        if len(shares) < n:
            factors.append(1.0)
        else:
            factors.append(n * max(sum(shares[j::n]) for j in range(n)))
    return sum(factors) / len(factors)


def latency_terms(cfg: ModelConfig, device: str | DeviceProfile, *, tokens: int, past: int = 0,
                  weights: str = "int4", kv: str = "int8", embeddings: str | None = None,
                  expert_load: Sequence[float] | Sequence[Sequence[float]] | None = None) -> LatencyTerms:
    """The time of one forward call over ``tokens`` new tokens after ``past`` cached positions
    (``tokens = 1, past = context``: a decoded token; ``past = 0``: a prefill), as in the module docstring.

    Bytes: the matrices (attention, dense FFNs, shared experts) and everything else a token reads
    (head, router, norms) at ``memory_bandwidth``; the routed experts the call touches at
    ``expert_bandwidth``; the KV cache at ``kv_bandwidth``. FLOPs: matrices and head at ``peak_ops``,
    routed experts at ``expert_gemm_ops``, attention scores and values at ``attention_ops``. Fixed:
    ``run_s`` + ``matrix_call_s`` per MatMulNBits call + per MoE layer ``moe_call_s`` and, per expert
    touched, ``expert_call_s`` (one token) or ``expert_gemm_call_s`` (several) + ``attention_call_s``
    per layer + ``op_s`` per small node. A multi-token call's routed FLOPs are scaled by
    :func:`routed_imbalance` at the profile's ``threads`` (``expert_load``: each expert's share of the
    token-slots per MoE layer; None: uniform routing)."""
    dev = load_device(device)
    if tokens < 1 or past < 0:
        raise ConfigError(f"tokens = {tokens}, past = {past}: need tokens >= 1 and past >= 0")
    p = param_counts(cfg)
    w = parse_precision(weights)
    matrix_params = cfg.n_layers * _attention_matmul(cfg) + p.dense_ffn + p.shared_experts
    if tokens == 1:
        touched = float(cfg.top_k) if cfg.is_moe else 0.0                  # experts per MoE layer
        read = weight_bytes(cfg, weights, embeddings=embeddings, active_only=True)
    else:   # a T-token prompt touches each expert with probability 1 - (1 - k/E)^T (uniform routing)
        touched = cfg.n_experts * (1.0 - (1.0 - cfg.top_k / cfg.n_experts) ** tokens) if cfg.is_moe else 0.0
        read = weight_bytes(cfg, weights, embeddings=embeddings) \
            - (p.routed_experts * w.bits_per_value / 8) * (1.0 - touched / max(cfg.n_experts, 1))
    expert_params = cfg.n_moe_layers * touched * _swiglu(cfg.d_model, cfg.d_expert) if cfg.is_moe else 0.0
    expert_bytes = expert_params * w.bits_per_value / 8
    kv_read = kv_cache_bytes(cfg, past, kv) if past else 0.0
    memory_s = (read - expert_bytes) / dev.memory_bandwidth \
        + expert_bytes / (dev.expert_bandwidth or dev.memory_bandwidth) \
        + kv_read / (dev.kv_bandwidth or dev.memory_bandwidth)
    # FLOPs of the call: every token's matrices, head and router; its routed experts; its attention
    # scores and values over the cache and (causal, halved as in flops_per_token) over the new tokens
    attention = 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (tokens * past + tokens * tokens / 2)
    dense = 2 * tokens * (matrix_params + cfg.d_model * cfg.vocab_size + cfg.d_model * cfg.n_experts * cfg.n_moe_layers)
    routed = 2 * tokens * p.routed_active
    if tokens > 1:
        routed *= routed_imbalance(cfg, dev.threads, expert_load)
    compute_s = dense / dev.peak_ops + routed / (dev.expert_gemm_ops or dev.peak_ops) \
        + attention / (dev.attention_ops or dev.peak_ops)
    fixed_s = dev.run_s + matrix_calls(cfg) * dev.matrix_call_s \
        + cfg.n_moe_layers * (dev.moe_call_s + touched * (dev.expert_call_s if tokens == 1 else dev.expert_gemm_call_s)) \
        + cfg.n_layers * dev.attention_call_s + small_ops(cfg) * dev.op_s
    return LatencyTerms(memory_s=memory_s, compute_s=compute_s, fixed_s=fixed_s)


def roofline(cfg: ModelConfig, device: str | DeviceProfile, *, weights: str = "int4",
             kv: str = "int8", context: int = 4096, prompt: int | None = None,
             embeddings: str | None = None) -> dict[str, float]:
    """Latency (see the module docstring): ``decode_ms_per_token`` (one token after ``context``
    cached positions), ``prefill_ms`` (a ``prompt``-token prompt, default ``context``), which bound
    binds each, and the fixed costs in each (``overhead_ms``, ``prefill_overhead_ms``)."""
    dev = load_device(device)
    prompt = context if prompt is None else prompt
    dec = latency_terms(cfg, dev, tokens=1, past=context, weights=weights, kv=kv, embeddings=embeddings)
    pre = latency_terms(cfg, dev, tokens=prompt, weights=weights, kv=kv, embeddings=embeddings)
    return {
        "decode_ms_per_token": 1e3 * dec.total_s,
        "decode_bound": dec.bound,
        "prefill_ms": 1e3 * pre.total_s,
        "prefill_bound": pre.bound,
        "overhead_ms": 1e3 * dec.fixed_s,
        "prefill_overhead_ms": 1e3 * pre.fixed_s,
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
