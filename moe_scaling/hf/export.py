"""Export a model to the Hugging Face layout: ``config.json`` + ``model.safetensors``.

:func:`export_checkpoint` takes a run written by :func:`moe_scaling.train.loop.train` (its checkpoint
folder, or a sweep's ``runs/<id>/`` that holds one in ``ckpt/``) and writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with no missing or unexpected keys
and that computes the same logits as our model (tests/test_export.py checks every architecture
against transformers 5.24). :func:`export_hf` does the same for a model in memory and
:func:`hf_state_dict` is the bare tensor mapping. Export needs NumPy and ``safetensors`` only
(no torch).

The architecture is :func:`moe_scaling.design.builder.hf_model_type` (``config.json`` is
:func:`moe_scaling.design.builder.hf_config`); a config no supported architecture represents is
refused with its one-line :class:`ConfigError`. Tensor names follow the checkpoints on the Hub:

==============================  ==============================================================
ours                            Hugging Face (``model.layers.{i}.`` prefix; torch Linear
                                weights are ``[out, in]``, so every matrix is transposed)
==============================  ==============================================================
``embed [V, d]``                ``model.embed_tokens.weight`` (``lm_head.weight`` only when
                                untied: ``lm_head [d, V]`` transposed)
``final_norm``                  ``model.norm.weight``
``attn_norm`` / ``ffn_norm``    ``input_layernorm.weight`` / ``post_attention_layernorm.weight``
``wqkv [d, (h+2kv) hd]``        ``self_attn.{q,k,v}_proj.weight`` (columns split at ``h hd``
                                and ``(h+kv) hd``; heads are contiguous ``hd`` blocks in both);
                                ``bqkv`` -> ``self_attn.{q,k,v}_proj.bias``
``wo [h hd, d]``                ``self_attn.o_proj.weight``
``q_norm`` / ``k_norm``         ``self_attn.q_norm.weight`` / ``self_attn.k_norm.weight``
dense ``w_gate_up [d, 2f]``     ``mlp.gate_proj.weight`` (first ``f`` columns),
                                ``mlp.up_proj.weight`` (last ``f``); ``w_down [d, f]`` ->
                                ``mlp.down_proj.weight`` (the same layout)
``router [d, E]``               ``mlp.gate.weight`` (mixtral: ``block_sparse_moe.gate.weight``)
``router_bias [E]``             glm4_moe ``mlp.gate.e_score_correction_bias`` (a buffer that
                                glm4_moe always has: zeros when ``router_bias`` is off)
``w_gate_up [E, d, 2f]``,       per expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``
``w_down [E, f, d]``            (mixtral: ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``);
                                transformers 5 fuses them into ``experts.gate_up_proj`` /
                                ``experts.down_proj`` when loading, and saves them per expert
shared ``w_gate_up``/``w_down`` one SwiGLU of the total shared width (all gates, then all ups,
                                is exactly that): qwen2_moe ``mlp.shared_expert.*``, glm4_moe
                                ``mlp.shared_experts.*`` (zero-width tensors when there is none)
``shared_gate [d, 1]``          qwen2_moe ``mlp.shared_expert_gate.weight``
==============================  ==============================================================

With ``dtype="bfloat16"`` every tensor is stored as bfloat16 except glm4_moe's router weight and
correction bias, which transformers keeps in float32 (``_keep_in_fp32_modules_strict``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from moe_scaling.hf.config import hf_config, hf_model_type
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_path, atomic_write_text
from moe_scaling.model.transformer import Transformer
from moe_scaling.train.rundir import RunDir

__all__ = ["hf_state_dict", "export_hf", "export_checkpoint", "read_run", "load_run", "DTYPES"]

DTYPES = ("float32", "bfloat16")

# model_type -> (MoE block module, names of an expert's gate / up / down projections)
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
# Tensors transformers keeps in float32 whatever the model dtype (glm4_moe).
_FP32_SUFFIXES = {"glm4_moe": (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")}


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------


def _pure_params(model_cfg: ModelConfig, params: Any) -> dict:
    """``params`` (a :class:`Transformer`, its ``nnx.State`` or ``nnx.to_pure_dict`` of it) as
    a nested dict of float32 NumPy arrays, checked against the shapes ``model_cfg`` builds."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not isinstance(params, Mapping):
        raise ConfigError(f"params: got {type(params).__name__}; pass a Transformer, its nnx.State "
                          "or nnx.to_pure_dict of it")
    expected = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[0]
        raise ConfigError(f"params: do not match the model config (first difference at {diff[0]}); "
                          "pass the parameters of a model built from this config")
    return jax.tree.map(lambda v: np.asarray(jax.device_get(v), np.float32), params)


def _swiglu(prefix: str, w_gate_up: np.ndarray, w_down: np.ndarray,
            names: tuple[str, str, str] = _SWIGLU) -> dict[str, np.ndarray]:
    """A fused ``[d, 2 f]`` gate/up matrix and a ``[d, f]`` down matrix (output-major, as
    :class:`~moe_scaling.model.transformer.DenseFFN` stores it) as three torch Linears."""
    gate, up = np.split(w_gate_up, 2, axis=-1)
    return {f"{prefix}{names[0]}.weight": gate.T, f"{prefix}{names[1]}.weight": up.T,
            f"{prefix}{names[2]}.weight": w_down}


def _attention(cfg: ModelConfig, prefix: str, a: Mapping[str, Any]) -> dict[str, np.ndarray]:
    q_end, k_end = cfg.n_heads * cfg.head_dim, (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
    out = {}
    for name, w in zip("qkv", np.split(a["wqkv"], [q_end, k_end], axis=1)):
        out[f"{prefix}{name}_proj.weight"] = w.T
    if cfg.attn_bias:
        for name, b in zip("qkv", np.split(a["bqkv"], [q_end, k_end])):
            out[f"{prefix}{name}_proj.bias"] = b
    out[f"{prefix}o_proj.weight"] = a["wo"].T
    if cfg.qk_norm:
        out[f"{prefix}q_norm.weight"] = a["q_norm"]["scale"]
        out[f"{prefix}k_norm.weight"] = a["k_norm"]["scale"]
    return out


def _moe(cfg: ModelConfig, mt: str, prefix: str, f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    block, names = _MOE_NAMES[mt]
    p = f"{prefix}{block}."
    out = {f"{p}gate.weight": f["router"].T}
    if mt == "glm4_moe":
        out[f"{p}gate.e_score_correction_bias"] = (
            f["router_bias"] if cfg.router_bias else np.zeros((cfg.n_experts,), np.float32))
    for e in range(cfg.n_experts):
        out.update(_swiglu(f"{p}experts.{e}.", f["w_gate_up"][e], f["w_down"][e].T, names))
    if mt == "qwen2_moe":
        out.update(_swiglu(f"{p}shared_expert.", f["shared"]["w_gate_up"], f["shared"]["w_down"]))
        out[f"{p}shared_expert_gate.weight"] = f["shared_gate"].T
    elif mt == "glm4_moe":
        if cfg.n_shared:
            out.update(_swiglu(f"{p}shared_experts.", f["shared"]["w_gate_up"], f["shared"]["w_down"]))
        else:  # glm4_moe builds a zero-width shared MLP when n_shared_experts is 0
            d = cfg.d_model
            out.update(_swiglu(f"{p}shared_experts.", np.zeros((d, 0), np.float32),
                               np.zeros((d, 0), np.float32)))
    return out


def hf_state_dict(model_cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our parameters as the tensors of the Hugging Face checkpoint of ``hf_model_type(model_cfg)``.

    ``params``: a :class:`Transformer` built from ``model_cfg``, its ``nnx.State``, or
    ``nnx.to_pure_dict`` of that state. Returns ``{name: float32 C-contiguous array}`` in the
    layout of the module docstring. Raises :class:`ConfigError` (one line) for a config no
    supported architecture represents or parameters of another config.
    """
    mt = hf_model_type(model_cfg)
    p = _pure_params(model_cfg, params)
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i in range(model_cfg.n_layers):
        b, pre = p["blocks"][i], f"model.layers.{i}."
        out[f"{pre}input_layernorm.weight"] = b["attn_norm"]["scale"]
        out[f"{pre}post_attention_layernorm.weight"] = b["ffn_norm"]["scale"]
        out.update(_attention(model_cfg, f"{pre}self_attn.", b["attn"]))
        if "router" in b["ffn"]:
            out.update(_moe(model_cfg, mt, pre, b["ffn"]))
        else:
            out.update(_swiglu(f"{pre}mlp.", b["ffn"]["w_gate_up"], b["ffn"]["w_down"]))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype = {dtype!r}: not an export dtype; use one of {', '.join(DTYPES)}")


def _safetensors_save():
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ConfigError("export: the safetensors package is not installed; "
                          "pip install safetensors (or the hf extra)") from None
    return save_file


def export_hf(model_cfg: ModelConfig, params: Any, out_dir: str | os.PathLike, *,
              dtype: str = "float32", card: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (and ``README.md`` when
    ``card`` is given), each atomically.

    ``dtype``: ``float32`` or ``bfloat16`` (the stored tensors and the config's ``dtype``).
    Returns ``{"out", "files", "model_type", "dtype", "tensors", "parameters", "bytes"}``;
    ``parameters`` counts the stored elements (glm4_moe's correction-bias buffer included).
    """
    _check_dtype(dtype)
    config = hf_config(model_cfg, dtype=dtype)  # refuses an unsupported config before any work
    save_file = _safetensors_save()
    tensors = hf_state_dict(model_cfg, params)
    if dtype == "bfloat16":
        import ml_dtypes

        keep = _FP32_SUFFIXES.get(config["model_type"], ())
        tensors = {k: v if k.endswith(keep) else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    out = Path(out_dir)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    files = ["config.json", "model.safetensors"]
    if card is not None:
        atomic_write_text(out / "README.md", card)
        files.append("README.md")
    return {"out": str(out), "files": files, "model_type": config["model_type"], "dtype": dtype,
            "tensors": len(tensors), "parameters": int(sum(v.size for v in tensors.values())),
            "bytes": int(sum(v.nbytes for v in tensors.values()))}


# --------------------------------------------------------------------------------------
# Runs written by train()
# --------------------------------------------------------------------------------------


def _checkpoint_dir(run_dir: Path) -> Path:
    """The orbax folder of a run (:attr:`moe_scaling.train.rundir.RunDir.checkpoints`): ``run_dir``
    itself, or its ``ckpt/`` (a sweep's run)."""
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir = {str(run_dir)!r}: no such directory; give the ckpt_dir of a "
                          "train() run or a sweep's runs/<id> folder")
    return RunDir(run_dir).checkpoints


def read_run(run_dir: str | os.PathLike, *, step: int | None = None
             ) -> tuple[Path, int, dict[str, Any]]:
    """``(checkpoint folder, step, record)`` of a run written by :func:`train`: the latest
    checkpoint unless ``step`` is given. The record holds ``configs`` (model, train, data),
    ``status`` and the loss ``curve``."""
    import orbax.checkpoint as ocp

    ckpt = _checkpoint_dir(Path(run_dir)).absolute()
    mngr = ocp.CheckpointManager(ckpt)
    try:
        steps = list(mngr.all_steps())
        if not steps:
            raise ConfigError(f"run_dir = {str(run_dir)!r}: holds no checkpoint; train first "
                              "(train(..., ckpt_dir=DIR))")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ConfigError(f"step = {step}: no checkpoint of that step in {str(run_dir)!r}; "
                              f"use one of {', '.join(map(str, sorted(steps)))}")
        record = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    finally:
        mngr.close()
    return ckpt, step, record


def _run_card(name: str, mt: str, cfg: ModelConfig, step: int, record: Mapping[str, Any],
              data: DataConfig) -> str:
    evals = [r["eval_loss"] for r in record.get("curve", []) if r.get("eval_loss") is not None]
    loss = f", eval loss {evals[-1]:.4f}" if evals else ""
    tok = ("bytes: token id = byte value (no tokenizer files)" if data.tokenizer == "byte"
           else f"{data.tokenizer} (tokenizer.json beside the weights)")
    return "\n".join([
        f"# {name}", "",
        f"Exported by `moe-export` from a moe_scaling training run: step {step} "
        f"({record.get('status', 'unknown')}{loss}).", "",
        f"- architecture: `{mt}` (transformers `AutoModelForCausalLM`)",
        f"- shape: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} KV), vocab {cfg.vocab_size}"
        + (f", {cfg.n_experts} experts top-{cfg.top_k}" if cfg.is_moe else ""),
        f"- tokenizer: {tok}",
        f"- trained on: {data.corpus} (sequence length {data.seq_len})", ""])


def load_run(run_dir: str | os.PathLike, *, step: int | None = None, check=None
             ) -> tuple[ModelConfig, DataConfig, Any, int, dict[str, Any]]:
    """``(model config, data config, model, step, record)`` of a run written by :func:`train` (latest
    checkpoint, or ``step``). ``check(model_cfg)`` runs before any array is restored (an exporter
    refusing a config fails fast)."""
    from moe_scaling.train.checkpoints import load_checkpoint

    ckpt, step, record = read_run(run_dir, step=step)
    configs = record.get("configs") or {}
    try:
        model_cfg = ModelConfig.from_dict(configs["model"])
        train_cfg = TrainConfig.from_dict(configs["train"])
        data_cfg = DataConfig.from_dict(configs["data"])
    except (KeyError, TypeError):
        raise ConfigError(f"run_dir = {str(run_dir)!r}: the checkpoint record holds no configs; "
                          "export a checkpoint written by moe_scaling.train.loop.train") from None
    if check is not None:
        check(model_cfg)
    model, _ = load_checkpoint(ckpt, model_cfg, train_cfg, data_cfg, step=step)
    return model_cfg, data_cfg, model, step, record


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      dtype: str = "float32", step: int | None = None) -> dict[str, Any]:
    """Export the model of a run written by :func:`train` (latest checkpoint, or ``step``).

    ``run_dir`` is the ``ckpt_dir`` given to :func:`train` or a sweep's ``runs/<id>/`` folder.
    The configs come from the checkpoint's record, so nothing else is needed. Writes
    ``config.json``, ``model.safetensors`` and a short ``README.md``; returns the
    :func:`export_hf` summary plus ``run``, ``step`` and ``status``.
    """
    _check_dtype(dtype)
    model_cfg, data_cfg, model, step, record = load_run(run_dir, step=step, check=hf_model_type)
    mt = hf_model_type(model_cfg)
    out = Path(out_dir)
    card = _run_card(out.name, mt, model_cfg, step, record, data_cfg)
    summary = export_hf(model_cfg, model, out, dtype=dtype, card=card)
    if data_cfg.tokenizer != "byte":
        summary["files"] = sorted(set(summary["files"]) | set(write_tokenizer_files(model_cfg, data_cfg, out)))
    summary.update(run=str(run_dir), step=step, status=record.get("status"))
    return summary


def write_tokenizer_files(model_cfg: ModelConfig, data_cfg: DataConfig, out: Path) -> list[str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` of the run's tokenizer (a ``bpe:N`` is
    read from its cache, or trained again on the corpus) beside the weights, so that
    ``AutoTokenizer.from_pretrained(out)`` loads it (``PreTrainedTokenizerFast``)."""
    from moe_scaling.files import atomic_write_text
    from moe_scaling.train.data import tokenizer_for

    tok = tokenizer_for(data_cfg)
    eos = tok.hf.id_to_token(tok.eos) if tok.eos is not None else None
    atomic_write_text(out / "tokenizer.json", tok.json_text)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
         "model_max_length": model_cfg.max_seq_len, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
