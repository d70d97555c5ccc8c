"""Hugging Face ``config.json`` in both directions: import (:func:`from_hf_config`, :func:`read_model_config`)
and export (:func:`hf_model_type`, :func:`hf_config`).

Every transformers convention of the package lives in :mod:`moe_scaling.hf`: this module for
configs, :mod:`moe_scaling.hf.export` for weights.

Import: ``model_type`` in :data:`HF_MODEL_TYPES`. Where the HF config names no dense reference width
(mixtral, olmoe, granitemoe), ``d_ff`` is set to the expert width so the granularity reads 1.

Export: ModelConfig -> Hugging Face ``model_type`` (checked against the transformers 5.24 sources; every
emitted config loads with ``AutoModelForCausalLM`` and has exactly ``costs.param_counts`` parameters):

==========================================  ============  ==============================================
our model                                   model_type    how the fields map
==========================================  ============  ==============================================
dense, QK-norm, no attention bias           ``qwen3``     head_dim given; no sliding window
dense, no QK-norm, no attention bias        ``llama``     head_dim given
dense, no QK-norm, q/k/v bias               ``qwen2``     (qwen2 always has q/k/v biases)
MoE, sigmoid router, ungated shared         ``glm4_moe``  n_routed_experts, moe_intermediate_size =
experts (or none), QK-norm on or off,                     d_expert, n_shared_experts = n_shared *
q/k/v bias on or off, first k layers dense                d_shared / d_expert (one SwiGLU of the total
                                                          shared width: the same function and weights
                                                          as several summed), use_qk_norm,
                                                          attention_bias (q/k/v only in glm4_moe),
                                                          first_k_dense_replace = n_dense_layers with
                                                          intermediate_size = d_ff, n_group = topk_group
                                                          = 1, routed_scaling_factor 1, full rotary
                                                          (partial_rotary_factor 1; glm4_moe's default
                                                          is 0.5), no MTP layers. The selection bias
                                                          ``e_score_correction_bias`` is a zero buffer,
                                                          not a parameter, so router_bias on or off are
                                                          both this config.
MoE, softmax router, no shared expert,      ``qwen3_moe`` mlp_only_layers = first n_dense_layers
QK-norm, no attention bias
MoE, softmax router, one gated shared       ``qwen2_moe`` shared_expert_intermediate_size = d_shared,
expert (shared_gate), no QK-norm                          qkv_bias = attn_bias, mlp_only_layers
MoE, softmax router, no shared expert,      ``mixtral``   intermediate_size = d_expert (mixtral always
no QK-norm, no bias, renormalised top-k,                  renormalises the top-k weights)
no dense layers
==========================================  ============  ==============================================

Anything else (a softmax router with an ungated shared expert, a sigmoid router with a gated one,
several gated shared experts, a shared width that is not a multiple of d_expert, dense QK-norm
with biases, ...) is refused with a one-line :class:`ConfigError`. (dots1 is glm4_moe with
QK-norm always on and an o_proj bias whenever attention_bias is set; glm4_moe covers it.)
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from moe_scaling.config import ModelConfig, read_mapping
from moe_scaling.errors import ConfigError

__all__ = ["HF_MODEL_TYPES", "from_hf_config", "read_model_config", "hf_model_type", "hf_config"]


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------

HF_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "glm4_moe", "dots1",
                  "llama", "qwen2", "qwen3", "mistral")


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Import a Hugging Face ``config.json`` mapping as a :class:`ModelConfig`.

    Supported ``model_type`` values: see :data:`HF_MODEL_TYPES`. Where the HF config names no
    dense reference width (mixtral, olmoe, granitemoe), ``d_ff`` is set to the expert width so the
    granularity reads 1.
    """
    mt = hf.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ConfigError(f"config.json model_type = {mt!r}: not supported; "
                          f"use one of {', '.join(HF_MODEL_TYPES)}")

    def need(key: str) -> Any:
        if key not in hf:
            raise ConfigError(f"config.json {key}: missing for model_type {mt}; add {key}")
        return hf[key]

    d_model = need("hidden_size")
    n_heads = need("num_attention_heads")
    common: dict[str, Any] = dict(
        vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
    )
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        return ModelConfig(**common, d_ff=need("intermediate_size"), qk_norm=(mt == "qwen3"),
                           attn_bias=(mt == "qwen2") or bool(hf.get("attention_bias", False)))
    if mt == "mixtral":
        w = need("intermediate_size")
        return ModelConfig(**common, d_ff=w, d_expert=w, n_experts=need("num_local_experts"),
                           top_k=need("num_experts_per_tok"), qk_norm=False, router="softmax",
                           norm_topk=True)
    if mt == "olmoe":
        w = need("intermediate_size")
        return ModelConfig(**common, d_ff=w, d_expert=w, n_experts=need("num_experts"),
                           top_k=need("num_experts_per_tok"), qk_norm=True, router="softmax",
                           norm_topk=bool(hf.get("norm_topk_prob", False)))
    if mt == "granitemoe":
        w = need("intermediate_size")
        return ModelConfig(**common, d_ff=w, d_expert=w, n_experts=need("num_local_experts"),
                           top_k=need("num_experts_per_tok"), qk_norm=False, router="softmax",
                           norm_topk=True)
    if mt in ("qwen2_moe", "qwen3_moe"):
        w = need("moe_intermediate_size")
        shared = int(hf.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
        # Dense layers are representable only as a leading block: mlp_only_layers == [0, .., k-1].
        dense_layers = list(hf.get("mlp_only_layers") or [])
        n_dense = len(dense_layers)
        sparse_step = hf.get("decoder_sparse_step", 1)
        if sparse_step not in (1, None) or dense_layers != list(range(n_dense)):
            raise ConfigError(f"config.json mlp_only_layers = {dense_layers} (decoder_sparse_step "
                              f"{sparse_step}): only leading dense layers are representable; "
                              "use mlp_only_layers [0, ..., k-1] and decoder_sparse_step 1")
        return ModelConfig(**common, d_ff=hf.get("intermediate_size") or w, d_expert=w,
                           n_experts=need("num_experts"), top_k=need("num_experts_per_tok"),
                           n_shared=1 if shared else 0, d_shared=shared or None,
                           n_dense_layers=n_dense, qk_norm=(mt == "qwen3_moe"), router="softmax",
                           norm_topk=bool(hf.get("norm_topk_prob", mt == "qwen3_moe")),
                           shared_gate=bool(shared), attn_bias=(mt == "qwen2_moe"))
    # glm4_moe, dots1: sigmoid router with correction bias, ungated shared experts, first-k dense
    w = need("moe_intermediate_size")
    n_shared = int(hf.get("n_shared_experts") or 0)
    return ModelConfig(**common, d_ff=need("intermediate_size"), d_expert=w,
                       n_experts=need("n_routed_experts"), top_k=need("num_experts_per_tok"),
                       n_shared=n_shared, d_shared=w if n_shared else None,
                       n_dense_layers=int(hf.get("first_k_dense_replace", 0)),
                       qk_norm=bool(hf.get("use_qk_norm", mt == "dots1")), router="sigmoid",
                       norm_topk=bool(hf.get("norm_topk_prob", True)), router_bias=True,
                       attn_bias=bool(hf.get("attention_bias", False)))


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """A :class:`ModelConfig` from any model file: our YAML/JSON (top-level or under ``model:``) or
    a Hugging Face ``config.json`` (recognised by its ``model_type`` key)."""
    data = read_mapping(path)
    if "model_type" in data:
        return from_hf_config(data)
    if "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    return ModelConfig.from_dict(data)


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _refuse(cfg: ModelConfig, what: str) -> None:
    kind = ("dense" if not cfg.is_moe else
            f"MoE ({cfg.router} router, {cfg.n_shared} shared{' gated' if cfg.shared_gate else ''})")
    raise ConfigError(f"model: no supported Hugging Face architecture represents a {kind} model "
                      f"with {what}; see moe_scaling.hf.config for the supported combinations")


def hf_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face ``model_type`` that represents ``cfg`` exactly (see the module docstring)."""
    if not cfg.is_moe:
        if cfg.qk_norm:
            if cfg.attn_bias:
                _refuse(cfg, "QK-norm and q/k/v biases")
            return "qwen3"
        return "qwen2" if cfg.attn_bias else "llama"
    shared_width = cfg.n_shared * cfg.d_shared
    if cfg.router == "sigmoid":
        if cfg.n_shared and cfg.shared_gate:
            _refuse(cfg, "a gated shared expert")
        if shared_width % cfg.d_expert:
            _refuse(cfg, f"shared width {shared_width} not a multiple of d_expert {cfg.d_expert}")
        return "glm4_moe"
    if cfg.n_shared:
        if not cfg.shared_gate:
            _refuse(cfg, "an ungated shared expert (use router: sigmoid for glm4_moe)")
        if cfg.n_shared != 1:
            _refuse(cfg, f"{cfg.n_shared} gated shared experts (qwen2_moe has one)")
        if cfg.qk_norm:
            _refuse(cfg, "QK-norm and a gated shared expert")
        return "qwen2_moe"
    if cfg.qk_norm:
        if cfg.attn_bias:
            _refuse(cfg, "QK-norm and q/k/v biases")
        return "qwen3_moe"
    if cfg.attn_bias or not cfg.norm_topk or cfg.n_dense_layers:
        _refuse(cfg, "no QK-norm and q/k/v biases, un-renormalised top-k or dense layers")
    return "mixtral"


_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "glm4_moe": "Glm4MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def hf_config(cfg: ModelConfig, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """``cfg`` as a Hugging Face ``config.json`` mapping (raises :class:`ConfigError` when no
    supported architecture represents it)."""
    mt = hf_model_type(cfg)
    out: dict[str, Any] = {
        "model_type": mt, "architectures": [_ARCHITECTURES[mt]],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
    }
    dense_layers = list(range(cfg.n_dense_layers))
    if mt in ("qwen3", "llama", "qwen2"):
        out["intermediate_size"] = cfg.d_ff
        if mt in ("qwen3", "llama"):
            out["attention_bias"] = False
        if mt in ("qwen3", "qwen2"):
            out["use_sliding_window"] = False
    elif mt == "glm4_moe":
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
        out.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.d_expert,
                   n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                   n_shared_experts=cfg.n_shared * cfg.d_shared // cfg.d_expert,
                   first_k_dense_replace=cfg.n_dense_layers, norm_topk_prob=cfg.norm_topk,
                   use_qk_norm=cfg.qk_norm, attention_bias=cfg.attn_bias, n_group=1, topk_group=1,
                   routed_scaling_factor=1.0, num_nextn_predict_layers=0)
    elif mt in ("qwen3_moe", "qwen2_moe"):
        out.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.d_expert,
                   num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                   norm_topk_prob=cfg.norm_topk, decoder_sparse_step=1, mlp_only_layers=dense_layers,
                   use_sliding_window=False, router_aux_loss_coef=0.01)
        if mt == "qwen3_moe":
            out["attention_bias"] = False
        else:
            out.update(shared_expert_intermediate_size=cfg.d_shared, qkv_bias=cfg.attn_bias)
    else:  # mixtral
        out.update(intermediate_size=cfg.d_expert, num_local_experts=cfg.n_experts,
                   num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0, sliding_window=None)
    return out
