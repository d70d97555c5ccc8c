"""Our decoder as an ONNX graph for ONNX Runtime's CPU kernels, with INT4 weights and a KV cache.

:func:`build_onnx` writes the same function as :class:`moe_scaling.model.transformer.Transformer`
(batch 1) with every linear and expert weight stored as ONNX Runtime's ``com.microsoft.MatMulNBits``
operand: 4-bit codes, groups of 32 along the input axis, one scale per group. The codes and scales
are exactly :func:`moe_scaling.model.quant.quantize_int4`'s (``q in [-8, 7]`` stored as the unsigned
nibble ``q + 8``, MatMulNBits' default zero point 8; the fp16 scales stored as float32, which
represents them exactly), so the runtime multiplies by the weights our QAT trained against:

    y = x @ W_hat,   W_hat[k, n] = (code[n, k] - 8) * scale[n, k // 32]

``accuracy_level`` selects how the runtime multiplies: 0 computes in float32 (the reference), 4
quantizes each activation block of 32 to int8 on the fly (symmetric, one scale per block) and uses
integer dot products: the int8-dynamic-activation / int4-weight scheme of phone runtimes.
Embeddings, the router, the shared-expert gates and the norms stay float32, as the cost model
counts them (:func:`moe_scaling.costs.weight_bytes`).

Inputs and outputs (``L`` layers, ``kv`` KV heads, ``hd = head_dim``; ``P`` cached positions, ``S``
new tokens)::

    input_ids        int64   [1, S]
    past_key_{i}     float32 [kv, P, hd]     (P = 0 for the first call)
    past_value_{i}   float32 [kv, P, hd]
    -> logits        float32 [S, vocab]
    -> present_key_{i}, present_value_{i}   [kv, P + S, hd]

Token ``s`` sits at position ``P + s`` (RoPE tables are initializers for ``max_positions``) and
attends to cache positions ``<= P + s``. One graph serves prefill (``S`` > 1) and decode (``S = 1``).

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
~6 kernel launches per expert per layer made decode 2x slower at 16 experts (bench/README.md).
Every shape is dynamic, which is what ExecuTorch's XNNPACK delegate cannot express
(docs/design.md, section 12).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.errors import ConfigError
from moe_scaling.model.quant import GROUP, check_quantizable, quantize_int4

__all__ = ["build_onnx", "pack_int4", "OPSET", "ACCURACY_LEVELS"]

OPSET = 21
MS_DOMAIN = "com.microsoft"
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
    """Writes one :class:`Transformer`'s forward pass into a :class:`_Graph` (see the module docstring)."""

    def __init__(self, g: _Graph, cfg: ModelConfig, accuracy_level: int):
        self.g, self.cfg, self.level = g, cfg, accuracy_level

    # ---- pieces -------------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, name: str) -> str:
        """``x @ w`` for an input-major ``w [K, N]`` as an INT4 MatMulNBits."""
        k, n = w.shape
        b, s = pack_int4(w)
        return self.g.op("MatMulNBits", [x, self.g.init(f"{name}.q4", b), self.g.init(f"{name}.scales", s)],
                         domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=GROUP, accuracy_level=self.level)

    def rms_norm(self, x: str, scale: np.ndarray, name: str, eps: float = 1e-6) -> str:
        g = self.g
        ms = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.init(f"{name}.scale", np.asarray(scale, np.float32))])

    def swiglu(self, x: str, w_gate_up: np.ndarray, w_down_in_major: np.ndarray, name: str,
               row_weight: str | None = None, shared_gate: tuple[str, int, int] | None = None) -> str:
        """``down(silu(x Wg) * x Wu)``; ``w_gate_up [d, 2f]`` gate first; ``w_down [f, d]``."""
        g = self.g
        f = w_gate_up.shape[1] // 2
        gate, up = g.op("Split", [self.linear(x, w_gate_up, f"{name}.gate_up"), g.const([f, f])], n_out=2, axis=-1)
        a = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        if shared_gate is not None:  # each of n shared experts scaled by sigmoid(x @ gate[:, i])
            gate_w, n, width = shared_gate
            s = g.op("Sigmoid", [g.op("MatMul", [x, gate_w])])
            a3 = g.op("Reshape", [a, g.const([0, n, width])])
            a = g.op("Reshape", [g.op("Mul", [a3, g.op("Unsqueeze", [s, g.const([-1])])]), g.const([0, n * width])])
        if row_weight is not None:
            a = g.op("Mul", [a, row_weight])
        return self.linear(a, w_down_in_major, f"{name}.down")

    def rope(self, x: str, cos: str, sin: str) -> str:
        """Rotate-half RoPE of ``x [S, heads, hd]`` with ``cos, sin [S, 1, hd]``."""
        g, half = self.g, self.cfg.head_dim // 2
        lo = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
        hi = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])])
        rot = g.op("Concat", [g.op("Neg", [hi]), lo], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    def attention(self, x: str, a: Mapping[str, Any], i: int, ctx: Mapping[str, str]) -> str:
        g, cfg = self.g, self.cfg
        h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        grp = h // kv
        qkv = self.linear(x, a["wqkv"], f"layers.{i}.wqkv")
        if "bqkv" in a and a["bqkv"] is not None:
            qkv = g.op("Add", [qkv, g.init(f"layers.{i}.bqkv", np.asarray(a["bqkv"], np.float32))])
        q, k, v = g.op("Split", [qkv, g.const([h * hd, kv * hd, kv * hd])], n_out=3, axis=-1)
        q = g.op("Reshape", [q, g.const([0, h, hd])])
        k = g.op("Reshape", [k, g.const([0, kv, hd])])
        v = g.op("Reshape", [v, g.const([0, kv, hd])])
        if cfg.qk_norm:
            q = self.rms_norm(q, a["q_norm"]["scale"], f"layers.{i}.q_norm")
            k = self.rms_norm(k, a["k_norm"]["scale"], f"layers.{i}.k_norm")
        q = g.op("Mul", [self.rope(q, ctx["cos"], ctx["sin"]), g.const(1.0 / math.sqrt(hd), np.float32)])
        k = self.rope(k, ctx["cos"], ctx["sin"])
        key = g.op("Concat", [f"past_key_{i}", g.op("Transpose", [k], perm=[1, 0, 2])], axis=1)
        val = g.op("Concat", [f"past_value_{i}", g.op("Transpose", [v], perm=[1, 0, 2])], axis=1)
        g.nodes.append(g.h.make_node("Identity", [key], [f"present_key_{i}"]))
        g.nodes.append(g.h.make_node("Identity", [val], [f"present_value_{i}"]))
        # the grp query heads sharing a KV head are stacked as grp * S rows of one [kv]-batched matmul
        qs = g.op("Reshape", [q, g.const([-1, kv, grp, hd])])
        qs = g.op("Reshape", [g.op("Transpose", [qs], perm=[1, 2, 0, 3]), g.const([kv, -1, hd])])
        scores = g.op("MatMul", [qs, g.op("Transpose", [key], perm=[0, 2, 1])])
        scores = g.op("Where", [ctx["visible"], scores, g.const(-np.inf, np.float32)])
        o = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), val])              # [kv, grp S, hd]
        o = g.op("Reshape", [o, g.const([kv, grp, -1, hd])])
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[2, 0, 1, 3]), g.const([-1, h * hd])])
        return self.linear(o, a["wo"], f"layers.{i}.wo")

    def moe(self, x: str, f: Mapping[str, Any], i: int) -> str:
        g, cfg = self.g, self.cfg
        logits = g.op("MatMul", [x, g.init(f"layers.{i}.router", np.asarray(f["router"], np.float32))])
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
        fc1s = g.init(f"layers.{i}.experts.fc1.scales", np.stack([s for _, s in packed]))
        fc2 = g.init(f"layers.{i}.experts.fc2.q4", np.stack([b.reshape(d, -1) for b, _ in down]))
        fc2s = g.init(f"layers.{i}.experts.fc2.scales", np.stack([s for _, s in down]))
        return g.op("QMoE", [x, select, fc1, fc1s, "", fc2, fc2s, "", "", "", "", "", "", "", scores],
                    domain=MS_DOMAIN, k=cfg.top_k, activation_type="swiglu", swiglu_fusion=1,
                    activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(cfg.norm_topk),
                    expert_weight_bits=4, block_size=GROUP, accuracy_level=self.level)

    # ---- the whole model ---------------------------------------------------------------------
    def model(self, p: Mapping[str, Any], max_positions: int) -> str:
        g, cfg = self.g, self.cfg
        onnx = g.onnx
        ids = g.op("Reshape", ["input_ids", g.const([-1])])
        s = g.op("Shape", [ids])                                       # [1]: S
        past = g.op("Gather", [g.op("Shape", ["past_key_0"]), g.const(1)], axis=0)   # scalar P
        s0 = g.op("Squeeze", [s, g.const([0])])
        pos = g.op("Range", [past, g.op("Add", [past, s0]), g.const(1)])              # [S] positions
        inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
        ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]
        ang = np.concatenate([ang, ang], axis=-1)
        ctx: dict[str, str] = {}
        for name, table in (("cos", np.cos(ang)), ("sin", np.sin(ang))):
            t = g.init(f"rope.{name}", table.astype(np.float32))
            ctx[name] = g.op("Unsqueeze", [g.op("Gather", [t, pos], axis=0), g.const([1])])   # [S, 1, hd]
        # causal visibility of cache position j to stacked query row r (head group, token r % S)
        grp = cfg.n_heads // cfg.n_kv_heads
        rows = g.op("Range", [g.const(0), g.op("Mul", [s0, g.const(grp)]), g.const(1)])
        row_pos = g.op("Add", [g.op("Mod", [rows, s0]), past])
        cols = g.op("Range", [g.const(0), g.op("Add", [past, s0]), g.const(1)])
        ctx["visible"] = g.op("LessOrEqual", [g.op("Unsqueeze", [cols, g.const([0])]),
                                              g.op("Unsqueeze", [row_pos, g.const([1])])])
        embed = g.init("embed", np.asarray(p["embed"], np.float32))
        x = g.op("Gather", [embed, ids], axis=0)                      # [S, d]
        for i, b in enumerate(p["blocks"][j] for j in range(cfg.n_layers)):
            a = self.attention(self.rms_norm(x, b["attn_norm"]["scale"], f"layers.{i}.attn_norm"), b["attn"], i, ctx)
            x = g.op("Add", [x, a])
            hn = self.rms_norm(x, b["ffn_norm"]["scale"], f"layers.{i}.ffn_norm")
            is_moe = cfg.is_moe and i >= cfg.n_dense_layers
            ff = b["ffn"]
            y = self.moe(hn, ff, i) if is_moe else self.swiglu(
                hn, ff["w_gate_up"], np.asarray(ff["w_down"]).T, f"layers.{i}.ffn")
            x = g.op("Add", [x, y])
        x = self.rms_norm(x, p["final_norm"]["scale"], "final_norm")
        head = np.asarray(p["embed"], np.float32).T if p.get("lm_head") is None else np.asarray(p["lm_head"], np.float32)
        g.nodes.append(onnx.helper.make_node("MatMul", [x, g.init("lm_head", np.ascontiguousarray(head))], ["logits"]))
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
    g = _Graph(onnx)
    _Builder(g, cfg, ACCURACY_LEVELS[activations]).model(params, max_positions)
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    kv, hd = cfg.n_kv_heads, cfg.head_dim
    inputs = [onnx.helper.make_tensor_value_info("input_ids", i64, [1, "S"])]
    outputs = [onnx.helper.make_tensor_value_info("logits", f32, ["S", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(onnx.helper.make_tensor_value_info(f"past_{kind}_{i}", f32, [kv, "P", hd]))
            outputs.append(onnx.helper.make_tensor_value_info(f"present_{kind}_{i}", f32, [kv, "T", hd]))
    graph = onnx.helper.make_graph(g.nodes, "moe_scaling_decoder", inputs, outputs, initializer=g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid(MS_DOMAIN, 1)],
                                   producer_name="moe_scaling")
    model.ir_version = 10
    return model
