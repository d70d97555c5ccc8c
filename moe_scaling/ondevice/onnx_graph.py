"""Our decoder as an ONNX graph for ONNX Runtime's CPU kernels, with INT4 weights and a KV cache.

:func:`build_onnx` writes the same function as :class:`moe_scaling.model.transformer.Transformer`
(batch 1) with every linear and expert weight stored as ONNX Runtime's ``com.microsoft.MatMulNBits``
operand: 4-bit codes, groups of 32 along the input axis, one scale per group. The codes and scales
are exactly :func:`moe_scaling.model.quant.quantize_int4`'s (``q in [-8, 7]`` stored as the unsigned
nibble ``q + 8``, MatMulNBits' default zero point 8; the scales stored as float16, which holds
them exactly), so the runtime multiplies by the weights our QAT trained against:

    y = x @ W_hat,   W_hat[k, n] = (code[n, k] - 8) * scale[n, k // 32]

MatMulNBits and QMoE take their scales in the activations' type (float32 here), so each fp16 scale
tensor goes through a ``Cast`` that ONNX Runtime folds into a constant when the session loads: the
file holds the 4.5 bits per weight the cost model counts (:data:`moe_scaling.costs.RUNTIME_STORAGE`),
the kernels see the same float32 values as before.

``accuracy_level`` selects how the runtime multiplies: 0 computes in float32 (the reference), 4
quantizes the activations to int8 on the fly, in blocks along the contraction axis, and uses integer
dot products: the int8-dynamic-activation / int4-weight scheme of phone runtimes.
Embeddings, the router, the shared-expert gates and the norms stay float32, as the cost model
counts them for this runtime (:func:`moe_scaling.costs.stored_bytes`).

Inputs and outputs (``L`` layers, ``kv`` KV heads, ``hd = head_dim``; ``P`` cached positions, ``S``
new tokens)::

    input_ids        int64   [1, S]
    past_key_{i}     float32 [1, kv, P, hd]     (P = 0 for the first call)
    past_value_{i}   float32 [1, kv, P, hd]
    -> logits        float32 [S, vocab]
    -> present_key_{i}, present_value_{i}   [1, kv, P + S, hd]

Token ``s`` sits at position ``P + s`` (RoPE tables are initializers for ``max_positions``) and
attends to cache positions ``<= P + s``. One graph serves prefill (``S`` > 1), a chunk after a cache,
and decode (``S = 1``). Attention is ORT's ``GroupQueryAttention`` (rotate-half RoPE inside it; QK-norm
is applied before it, its own q/k-norm inputs being CUDA/WebGPU only, so ``head_dim`` must be a
multiple of 16), and every RMSNorm is fused with the residual add before it
(``SkipSimplifiedLayerNormalization``): 365 nodes per token for 16 layers instead of ~1,200.

**Routed experts compute only their tokens.** Each MoE layer's routed experts are one
``com.microsoft.QMoE`` node (ONNX Runtime's CPU kernel): the router's scores (softmax, or sigmoid
plus the selection bias) go in as ``router_probs`` for the top-k choice and, unbiased, as
``router_weights`` for the combine weights, renormalised when ``norm_topk``; the experts' INT4
weights are stacked ``[E, 2 f, d / 2]`` with gate and up rows interleaved (the kernel's SwiGLU
layout, ``silu(gate) * up`` with ``alpha = 1``, ``beta = 0`` and no clamp) and ``[E, d, f / 2]``.
The kernel groups tokens by expert and runs each used expert once: a decoded token reads ``k``
experts' weights per layer, as the roofline assumes. Shared experts and dense layers are plain
MatMulNBits SwiGLUs. An earlier version spelled the dispatch out in standard ops (stable sort by
``TopK``, ``Split`` by counts, one SwiGLU per expert, ``ScatterND``): the same logits to 1e-6, but
~6 kernel launches per expert per layer left the MoE decoding only 1.17x faster than the dense model
of equal memory (1.8x with QMoE; bench/README.md). Every shape is dynamic, which is what ExecuTorch's
XNNPACK delegate cannot express (docs/design.md, section 9).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.quant import GROUP, check_quantizable, quantize_int4

__all__ = ["build_onnx", "pack_int4", "OPSET", "ACCURACY_LEVELS"]

OPSET = 21
MS_DOMAIN = "com.microsoft"
EPS = 1e-6  # every RMSNorm's epsilon (moe_scaling.model.transformer.RMSNorm)
ACCURACY_LEVELS = {"fp32": 0, "int8": 4}
"""``activations`` name -> MatMulNBits ``accuracy_level`` (0: float32 products, 4: int8 activations)."""


def pack_int4(w: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """``(B uint8 [N, K / group, group / 2], scales float32 [N, K / group])`` of an input-major weight
    ``w [K, N]`` (``y = x @ w``), quantized by :func:`quantize_int4` along ``K``.

    Two codes per byte, the lower ``k`` in the low nibble; code = ``q + 8``."""
    k, n = w.shape
    q, scale = quantize_int4(np.asarray(w, np.float32), axis=0, group=group)  # [N, K/g, g], [N, K/g, 1]
    codes = (np.asarray(q, np.int16) + 8).astype(np.uint8).reshape(n, k // group, group)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, np.asarray(scale, np.float32).reshape(n, k // group)


class _Graph:
    """A small builder: named initializers, nodes with fresh output names, the ``onnx`` helpers."""

    def __init__(self, onnx_module):
        self.onnx = onnx_module
        self.h = onnx_module.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scales(self, name: str, array: np.ndarray) -> str:
        """INT4 group scales stored as float16 (exact: :func:`quantize_int4` rounds them to fp16),
        cast to float32 for the kernel; the cast of a constant is folded when the session loads."""
        s16 = np.asarray(array, np.float16)
        if not np.array_equal(s16.astype(np.float32), array):
            raise ValueError(f"{name}: scales not exactly representable in float16")
        return self.op("Cast", [self.init(name, s16)], to=self.onnx.TensorProto.FLOAT)

    def const(self, values, dtype=np.int64) -> str:
        """A 1-D (or scalar when ``values`` is a number) constant initializer, shared by value."""
        arr = np.asarray(values, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.fresh("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


class _Builder:
    """Writes one :class:`Transformer`'s forward pass into a :class:`_Graph` (see the module docstring).

    The residual stream is ``[1, S, d]``. Each norm is fused with the residual add before it
    (``SkipSimplifiedLayerNormalization`` returns the normalised sum and the sum)."""

    def __init__(self, g: _Graph, cfg: ModelConfig, accuracy_level: int):
        self.g, self.cfg, self.level = g, cfg, accuracy_level

    # ---- pieces -------------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, name: str) -> str:
        """``x @ w`` for an input-major ``w [K, N]`` as an INT4 MatMulNBits."""
        k, n = w.shape
        b, s = pack_int4(w)
        return self.g.op("MatMulNBits", [x, self.g.init(f"{name}.q4", b), self.g.scales(f"{name}.scales", s)],
                         domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=GROUP, accuracy_level=self.level)

    def add_norm(self, y: str, residual: str | None, scale: np.ndarray, name: str) -> tuple[str, str]:
        """``(rms_norm(residual + y) * scale, residual + y)``; without a residual, ``y`` is the stream."""
        g, gamma = self.g, self.g.init(f"{name}.scale", np.asarray(scale, np.float32))
        if residual is None:
            return g.op("SimplifiedLayerNormalization", [y, gamma], axis=-1, epsilon=EPS, stash_type=1), y
        out, _, _, total = g.op("SkipSimplifiedLayerNormalization", [y, residual, gamma], n_out=4,
                                domain=MS_DOMAIN, epsilon=EPS)
        return out, total

    def swiglu(self, x: str, w_gate_up: np.ndarray, w_down_in_major: np.ndarray, name: str,
               shared_gate: tuple[str, int, int] | None = None) -> str:
        """``down(silu(x Wg) * x Wu)``; ``w_gate_up [d, 2f]`` gate first; ``w_down [f, d]``."""
        g = self.g
        f = w_gate_up.shape[1] // 2
        gate, up = g.op("Split", [self.linear(x, w_gate_up, f"{name}.gate_up"), g.const([f, f])], n_out=2, axis=-1)
        a = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])     # ORT fuses silu (QuickGelu)
        if shared_gate is not None:  # each of n shared experts scaled by sigmoid(x @ gate[:, i])
            gate_w, n, width = shared_gate
            sig = g.op("Unsqueeze", [g.op("Sigmoid", [g.op("MatMul", [x, gate_w])]), g.const([-1])])
            a4 = g.op("Reshape", [a, g.const([1, -1, n, width])])
            a = g.op("Reshape", [g.op("Mul", [a4, sig]), g.const([1, -1, n * width])])
        return self.linear(a, w_down_in_major, f"{name}.down")

    def attention(self, x: str, a: Mapping[str, Any], i: int, ctx: Mapping[str, str]) -> str:
        """GroupQueryAttention on the ``q|k|v`` projection (packed, or split for QK-norm): rotate-half
        RoPE at positions ``P..P+S-1``, causal softmax over the cache, the new K/V appended to it."""
        g, cfg = self.g, self.cfg
        qkv = self.linear(x, a["wqkv"], f"layers.{i}.wqkv")
        if a.get("bqkv") is not None:
            qkv = g.op("Add", [qkv, g.init(f"layers.{i}.bqkv", np.asarray(a["bqkv"], np.float32))])
        q, k, v = qkv, "", ""
        if cfg.qk_norm:   # GQA's own q/k-norm inputs run on CUDA/WebGPU only: normalise each head first
            h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
            q, k, v = g.op("Split", [qkv, g.const([h * hd, kv * hd, kv * hd])], n_out=3, axis=-1)
            q, k = (g.op("Reshape", [g.op("SimplifiedLayerNormalization", [
                        g.op("Reshape", [t, g.const([1, -1, heads, hd])]),
                        g.init(f"layers.{i}.{name}.scale", np.asarray(a[name]["scale"], np.float32))],
                        axis=-1, epsilon=EPS, stash_type=1), g.const([1, -1, heads * hd])])
                    for t, name, heads in ((q, "q_norm", h), (k, "k_norm", kv)))
        inputs = [q, k, v, f"past_key_{i}", f"past_value_{i}", ctx["seqlens_k"], ctx["total"], ctx["cos"], ctx["sin"]]
        out = g.fresh("attention")
        g.nodes.append(g.h.make_node("GroupQueryAttention", inputs, [out, f"present_key_{i}", f"present_value_{i}"],
                                     domain=MS_DOMAIN, num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads,
                                     do_rotary=1, rotary_interleaved=0))
        return self.linear(out, a["wo"], f"layers.{i}.wo")

    def moe(self, x: str, f: Mapping[str, Any], i: int) -> str:
        g, cfg = self.g, self.cfg
        logits = g.op("Reshape", [g.op("MatMul", [x, g.init(f"layers.{i}.router", np.asarray(f["router"], np.float32))]),
                                  g.const([-1, cfg.n_experts])])
        scores = g.op("Softmax" if cfg.router == "softmax" else "Sigmoid", [logits], **(
            {"axis": -1} if cfg.router == "softmax" else {}))
        select = scores
        if f.get("router_bias") is not None:
            select = g.op("Add", [scores, g.init(f"layers.{i}.router_bias", np.asarray(f["router_bias"], np.float32))])
        y = self.qmoe(x, f, i, select, scores)
        if cfg.n_shared:
            sg = None
            if f.get("shared_gate") is not None:
                sg = (g.init(f"layers.{i}.shared_gate", np.asarray(f["shared_gate"], np.float32)),
                      cfg.n_shared, cfg.d_shared)
            sh = f["shared"]
            y = g.op("Add", [y, self.swiglu(x, sh["w_gate_up"], np.asarray(sh["w_down"]).T, f"layers.{i}.shared",
                                            shared_gate=sg)])
        return y

    def qmoe(self, x: str, f: Mapping[str, Any], i: int, select: str, scores: str) -> str:
        """The routed experts as one ``com.microsoft.QMoE`` node: top-k of ``select``, combine
        weights gathered from ``scores`` (``router_weights``), interleaved SwiGLU (fusion 1)."""
        g, cfg = self.g, self.cfg
        e, d, fw = cfg.n_experts, cfg.d_model, cfg.d_expert
        # CPU QMoE reads FC1 rows interleaved (gate_0, up_0, gate_1, up_1, ...): interleave our columns
        gate_up = np.asarray(f["w_gate_up"], np.float32)
        inter = np.stack([gate_up[:, :, :fw], gate_up[:, :, fw:]], axis=-1).reshape(e, d, 2 * fw)
        packed = [pack_int4(inter[j]) for j in range(e)]
        down = [pack_int4(np.asarray(f["w_down"][j])) for j in range(e)]
        fc1 = g.init(f"layers.{i}.experts.fc1.q4", np.stack([b.reshape(2 * fw, -1) for b, _ in packed]))
        fc1s = g.scales(f"layers.{i}.experts.fc1.scales", np.stack([s for _, s in packed]))
        fc2 = g.init(f"layers.{i}.experts.fc2.q4", np.stack([b.reshape(d, -1) for b, _ in down]))
        fc2s = g.scales(f"layers.{i}.experts.fc2.scales", np.stack([s for _, s in down]))
        return g.op("QMoE", [x, select, fc1, fc1s, "", fc2, fc2s, "", "", "", "", "", "", "", scores],
                    domain=MS_DOMAIN, k=cfg.top_k, activation_type="swiglu", swiglu_fusion=1,
                    activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(cfg.norm_topk),
                    expert_weight_bits=4, block_size=GROUP, accuracy_level=self.level)

    # ---- the whole model ---------------------------------------------------------------------
    def model(self, p: Mapping[str, Any], max_positions: int) -> str:
        g, cfg = self.g, self.cfg
        int32 = g.onnx.TensorProto.INT32
        past = g.op("Gather", [g.op("Shape", ["past_key_0"]), g.const(2)], axis=0)             # scalar P
        total = g.op("Add", [past, g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)])
        ctx = {"total": g.op("Cast", [total], to=int32),                                     # P + S
               "seqlens_k": g.op("Cast", [g.op("Reshape", [g.op("Sub", [total, g.const(1)]), g.const([1])])], to=int32)}
        inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
        ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]           # [positions, hd / 2]
        ctx["cos"] = g.init("rope.cos", np.cos(ang).astype(np.float32))
        ctx["sin"] = g.init("rope.sin", np.sin(ang).astype(np.float32))
        embed = g.init("embed", np.asarray(p["embed"], np.float32))
        y, residual = g.op("Gather", [embed, "input_ids"], axis=0), None                 # [1, S, d]
        for i in range(cfg.n_layers):
            b = p["blocks"][i]
            h, residual = self.add_norm(y, residual, b["attn_norm"]["scale"], f"layers.{i}.attn_norm")
            a = self.attention(h, b["attn"], i, ctx)
            h, residual = self.add_norm(a, residual, b["ffn_norm"]["scale"], f"layers.{i}.ffn_norm")
            ff = b["ffn"]
            if cfg.is_moe and i >= cfg.n_dense_layers:
                y = self.moe(h, ff, i)
            else:
                y = self.swiglu(h, ff["w_gate_up"], np.asarray(ff["w_down"]).T, f"layers.{i}.ffn")
        x, _ = self.add_norm(y, residual, p["final_norm"]["scale"], "final_norm")
        # a tied head reads the embedding table itself (Gemm with transB): stored once, as counted
        tied = p.get("lm_head") is None
        head = embed if tied else g.init("lm_head", np.asarray(p["lm_head"], np.float32))
        rows = g.op("Reshape", [x, g.const([-1, cfg.d_model])])
        g.nodes.append(g.h.make_node("Gemm", [rows, head], ["logits"], transB=int(tied)))
        return "logits"


def build_onnx(cfg: ModelConfig, params: Mapping[str, Any], *, activations: str = "int8",
               max_positions: int = 4096) -> Any:
    """The ``onnx.ModelProto`` of a model (``params``: ``nnx.to_pure_dict`` of its state, NumPy or JAX
    leaves) for ONNX Runtime >= 1.20. ``activations``: ``"int8"`` (dynamic int8 activations, the
    on-device scheme) or ``"fp32"`` (float products: the same INT4 weights, for exact comparison).

    The input embedding and the output head are float32 (tied models store the table twice: once as
    the gather table, once transposed as the head; the cost model counts the table once).
    """
    import onnx

    if activations not in ACCURACY_LEVELS:
        raise ConfigError(f"activations = {activations!r}: use one of {', '.join(ACCURACY_LEVELS)}")
    if not isinstance(max_positions, int) or max_positions < 1:
        raise ConfigError(f"max_positions = {max_positions!r}: must be a whole number >= 1; e.g. 4096")
    check_quantizable(cfg)
    if cfg.head_dim % 16:
        raise ConfigError(f"model.head_dim = {cfg.head_dim}: ONNX Runtime's CPU attention (GroupQueryAttention) "
                          "needs a multiple of 16; pick head_dim 16, 32, 64 or 128")
    g = _Graph(onnx)
    _Builder(g, cfg, ACCURACY_LEVELS[activations]).model(params, max_positions)
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    kv, hd = cfg.n_kv_heads, cfg.head_dim
    inputs = [onnx.helper.make_tensor_value_info("input_ids", i64, [1, "S"])]
    outputs = [onnx.helper.make_tensor_value_info("logits", f32, ["S", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(onnx.helper.make_tensor_value_info(f"past_{kind}_{i}", f32, [1, kv, "P", hd]))
            outputs.append(onnx.helper.make_tensor_value_info(f"present_{kind}_{i}", f32, [1, kv, "T", hd]))
    graph = onnx.helper.make_graph(g.nodes, "moe_scaling_decoder", inputs, outputs, initializer=g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid(MS_DOMAIN, 1)],
                                   producer_name="moe_scaling")
    model.ir_version = 10
    return model
