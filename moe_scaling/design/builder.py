"""From a sweet spot or a spec to a model directory a trainer and transformers can consume.

:func:`build` writes ``DIR/``:

* ``config.json``: the model as a Hugging Face config (:func:`hf_config`);
* ``model.yaml``: the same model as our :class:`ModelConfig` (exact, for ``moe_scaling.train.loop``);
* ``recipe.yaml``: the four training stages that consume it (:func:`make_recipe`);
* ``costs.json``: :func:`costs.cost_summary` of the model on the chosen precisions and device;
* ``README.md``: a short model card.

Configs come from a sweet spot (``moe-fit --budget-mem ... --json`` output, read with
:meth:`moe_scaling.design.candidate.Candidate.from_dict`), a fit plus a budget
(:func:`build_from_fit`: the search and the build in one call, used by ``moe-fit --emit`` and
``moe-build --fit``), a ModelConfig YAML/JSON, or an explicit spec such as
``--active 922M --total 5.3B --granularity 8 --shared 1`` (:func:`config_from_spec`).

The Hugging Face ``config.json`` comes from :func:`moe_scaling.hf.config.hf_config` (the
architecture map is documented there).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from moe_scaling.config import ModelConfig
from moe_scaling.costs import cost_summary
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_write_text
from moe_scaling.hf.config import hf_config, hf_model_type
from moe_scaling.units import format_count, parse_count, parse_precision
from moe_scaling.design.search import NothingFits, SearchResult, search
from moe_scaling.design.space import ArchSpace, Budget, expert_line, layouts, trunks
from moe_scaling.design.candidate import LossModel

__all__ = ["config_from_spec", "count_tolerance", "make_recipe", "RecipeDefaults", "model_card", "build",
           "build_from_fit"]


# --------------------------------------------------------------------------------------
# From an explicit spec: --active 922M --total 5.3B --granularity 8 --shared 1
# --------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"^\s*(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[+-]?\d+))?\s*(?P<unit>[KMBT])?\s*$")
_UNIT = {None: 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def count_tolerance(text: str | float) -> float:
    """Half a unit in the last digit written: ``922M`` -> 0.5M, ``5.3B`` -> 0.05B, ``1e12`` ->
    0.5e12. A number given as a float (not text) gets 0.5 % of its value."""
    if not isinstance(text, str):
        return 0.005 * float(text)
    m = _NUM_RE.match(text)
    if not m:
        raise ConfigError(f"count = {text!r}: not a count; write e.g. 0.9B, 922M or 1e12")
    decimals = len(m["frac"] or "")
    return 0.5 * 10.0 ** (int(m["exp"] or 0) - decimals) * _UNIT[m["unit"]]


@dataclass(frozen=True)
class SpecMatch:
    """The config :func:`config_from_spec` chose and how close it came."""

    config: ModelConfig
    params_active: int
    params_total: int
    within_tolerance: bool
    candidates_within_tolerance: int


def config_from_spec(active: str | float, total: str | float, *, granularity: int = 8,
                     shared: int = 1, space: ArchSpace = ArchSpace(n_layers_max=96),
                     aspect_target: float = 40.0) -> SpecMatch:
    """The family member (:class:`moe_scaling.design.space.ArchSpace` layout) whose parameter counts match a card.

    Every trunk of ``space`` with the layout (``granularity``, ``shared``) is scanned over its
    expert counts; a model matches when both counts round to the figures given (within
    :func:`count_tolerance`). Among matches the one with ``d_model / n_layers`` closest to
    ``aspect_target`` (MobileMoE-L: 1280 / 32 = 40) wins, then the smallest relative error. When
    nothing matches, the closest model (max relative error of the two counts) is returned with
    ``within_tolerance=False``. ``granularity 1`` with ``shared 0`` and ``total == active`` asks
    for a dense model.
    """
    A, T = parse_count(active, field="active"), parse_count(total, field="total")
    tol_a, tol_t = count_tolerance(active), count_tolerance(total)
    if A > T + tol_t:
        raise ConfigError(f"active = {active!r}: exceeds total ({total!r}); give active <= total")
    budget = Budget(memory=1, tokens=1.0)          # counts only; precisions do not matter here
    dense_wanted = abs(T - A) <= tol_a + tol_t
    best_key, best, n_match = None, None, 0
    for trunk in trunks(space):
        if dense_wanted:
            lines = [expert_line(space, trunk, None, budget)]
        else:
            lay = (granularity, shared)
            if lay not in layouts(space, trunk.d_model, (granularity,), (shared,)):
                continue
            lines = [expert_line(space, trunk, lay, budget)]
        for line in lines:
            if line is None:
                continue
            err = np.maximum(np.abs(line.params_active / A - 1), np.abs(line.params_total / T - 1))
            ok = (np.abs(line.params_active - A) <= tol_a) & (np.abs(line.params_total - T) <= tol_t)
            n_match += int(ok.sum())
            i = int(np.argmin(np.where(ok, err, np.inf))) if ok.any() else int(np.argmin(err))
            aspect_gap = abs(trunk.d_model / trunk.n_layers - aspect_target)
            key = (0, aspect_gap, float(err[i])) if ok.any() else (1, float(err[i]), aspect_gap)
            if best_key is None or key < best_key:
                best_key, best = key, (line, i, bool(ok.any()))
    if best is None:
        raise ConfigError(f"granularity = {granularity}, shared = {shared}: no model of the family "
                          "has this layout (d_expert must be a multiple of 64); pick another granularity")
    line, i, ok = best
    return SpecMatch(line.config(space, i), int(line.params_active[i]), int(line.params_total[i]),
                     ok, n_match)


# --------------------------------------------------------------------------------------
# recipe.yaml
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeDefaults:
    """Stated defaults of the four-stage recipe. Every value is a parameter to set, not a finding.

    Token counts of later stages are fractions of the pre-training tokens. Batches are in
    sequences of ``seq_len`` tokens. Learning rates are peak AdamW rates.
    """

    seq_len: int = 4096
    pretrain_batch: int = 1024          # 4.2M tokens per step at 4096
    pretrain_lr: float = 2e-3
    pretrain_warmup_tokens: float = 2e9
    mid_fraction: float = 0.1           # mid-training: 10 % of pre-training tokens, LR annealed to 0
    mid_seq_len: int = 8192             # and a longer context
    mid_batch: int = 512
    sft_tokens: float = 4e9
    sft_batch: int = 128
    sft_lr: float = 5e-5
    sft_epochs: int = 2
    qat_fraction: float = 0.01          # QAT: 1 % of pre-training tokens
    qat_batch: int = 256
    qat_lr: float = 1e-5
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3


def make_recipe(cfg: ModelConfig, *, tokens: float, weights: str = "int4", kv: str = "int8",
                defaults: RecipeDefaults = RecipeDefaults(), tokenizer: str | None = None) -> dict[str, Any]:
    """The four-stage recipe (pre-training, mid-training, instruction fine-tuning, QAT) as a
    mapping; ``weights`` / ``kv`` set the QAT target (bits, group size, scale format);
    ``tokenizer`` (``byte``, ``bpe:N`` or ``tokenizer.json`` beside the recipe) is the one
    ``moe-train`` uses when it is given none."""
    d = defaults
    w, k = parse_precision(weights), parse_precision(kv, field="kv")
    moe = {"aux_loss_coef": d.aux_loss_coef, "z_loss_coef": d.z_loss_coef,
           "router_bias_update": cfg.router == "sigmoid"} if cfg.is_moe else {}
    common = {"optimizer": "adamw", "beta1": 0.9, "beta2": 0.95, "weight_decay": d.weight_decay,
              "grad_clip": 1.0, **moe}
    return {
        "model": "model.yaml",
        **({"tokenizer": tokenizer} if tokenizer else {}),
        "note": "Every value is a stated default (moe_scaling.design.builder.RecipeDefaults), not a measured optimum.",
        "stages": [
            {"name": "pretraining", "tokens": float(tokens), "batch_size": d.pretrain_batch,
             "seq_len": d.seq_len, "lr": d.pretrain_lr,
             "schedule": {"kind": "wsd", "warmup_tokens": d.pretrain_warmup_tokens, "decay": "none",
                          "comment": "warmup then constant; the decay happens in mid-training"},
             "data": "general web + code + math mixture", **common},
            {"name": "midtraining", "tokens": float(tokens) * d.mid_fraction, "batch_size": d.mid_batch,
             "seq_len": d.mid_seq_len, "lr": d.pretrain_lr,
             "schedule": {"kind": "linear_decay", "from": d.pretrain_lr, "to": 0.0},
             "data": "high-quality and long-context mixture", **common},
            {"name": "instruction_finetuning", "tokens": d.sft_tokens, "epochs": d.sft_epochs,
             "batch_size": d.sft_batch, "seq_len": d.seq_len, "lr": d.sft_lr,
             "schedule": {"kind": "cosine", "warmup_fraction": 0.03, "min_lr_ratio": 0.0},
             "loss": "assistant tokens only", **common},
            {"name": "quantization_aware_training", "tokens": float(tokens) * d.qat_fraction,
             "batch_size": d.qat_batch, "seq_len": d.seq_len, "lr": d.qat_lr,
             "schedule": {"kind": "constant", "warmup_fraction": 0.01},
             "weight_bits": w.bits, "group_size": w.group_size, "scale_dtype":
             f"fp{w.scale_bits}" if w.group_size else None, "kv_bits": k.bits,
             "quantizer": "symmetric per-group fake-quant, straight-through estimator",
             "data": "replay of the instruction and mid-training mixtures", **common},
        ],
    }


# --------------------------------------------------------------------------------------
# README.md and build()
# --------------------------------------------------------------------------------------


def model_card(name: str, cfg: ModelConfig, costs: Mapping[str, Any], recipe: Mapping[str, Any],
               source: str, prediction: Mapping[str, Any] | None = None) -> str:
    """A short Markdown model card."""
    mt = hf_model_type(cfg)
    lines = [f"# {name}", "", f"Generated by `moe-build` from {source}. An untrained architecture: "
             "numbers below are counts and roofline estimates, not measurements.", "",
             "| | |", "|---|---|",
             f"| parameters | {format_count(costs['params_total'])} total, {format_count(costs['params_active'])} "
             f"active per token ({costs['params_total']:,} / {costs['params_active']:,}; tied "
             f"embeddings count once) |",
             f"| shape | d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads "
             f"({cfg.n_kv_heads} KV, head_dim {cfg.head_dim}), vocab {cfg.vocab_size:,} |"]
    if cfg.is_moe:
        shared = f" + {cfg.n_shared} shared of width {cfg.d_shared}" if cfg.n_shared else ""
        lines.append(f"| experts | {cfg.n_experts} routed of width {cfg.d_expert}, top-{cfg.top_k} "
                     f"{cfg.router}{shared}; granularity {cfg.granularity:g}, expansion "
                     f"{cfg.expansion:g}"
                     + (f"; first {cfg.n_dense_layers} layers dense" if cfg.n_dense_layers else "") + " |")
    else:
        lines.append(f"| FFN | dense SwiGLU of width {cfg.d_ff} |")
    lines += [f"| Hugging Face | `{mt}` (`config.json`) |",
              f"| on device | {costs['total_bytes'] / 1e9:.2f} GB = {costs['weight_bytes'] / 1e9:.2f} GB "
              f"weights ({costs['weights']}) + {costs['kv_cache_bytes'] / 1e6:.0f} MB KV cache "
              f"({costs['kv']}, {costs['context']} tokens) |",
              f"| FLOPs per token | {costs['flops_per_token_forward'] / 1e9:.2f} G forward at context "
              f"{costs['context']} |"]
    if "device" in costs:
        lines.append(f"| {costs['device']} (roofline) | decode {costs['decode_ms_per_token']:.1f} "
                     f"ms/token ({costs['decode_bound']}-bound), prefill {costs['prompt_tokens']} "
                     f"tokens {costs['prefill_ms']:.0f} ms |")
    if prediction:
        iv = prediction.get("predicted_loss_interval")
        lines.append(f"| predicted loss | {prediction['predicted_loss']:.4f}"
                     + (f" ({prediction.get('interval_level') or 0.9:g} interval {iv[0]:.4f}-{iv[1]:.4f})" if iv else "")
                     + f" after {prediction['tokens']:.3g} tokens, by the fitted law (an extrapolation) |")
    lines += ["", "## Recipe (`recipe.yaml`)", ""]
    for s in recipe["stages"]:
        extra = (f", {s['weight_bits']}-bit weights in groups of {s['group_size']}"
                 if s["name"] == "quantization_aware_training" else "")
        lines.append(f"- {s['name']}: {s['tokens']:.3g} tokens, batch {s['batch_size']} x "
                     f"{s['seq_len']}, lr {s['lr']:g} ({s['schedule']['kind']}){extra}")
    lines += ["", "All recipe values are stated defaults to tune, not claims. Files: `config.json` "
              "(transformers), `model.yaml` (moe_scaling), `recipe.yaml`, `costs.json`.", ""]
    return "\n".join(lines)


def build(cfg: ModelConfig, out_dir: str | Path, *, name: str | None = None, weights: str = "int4",
          kv: str = "int8", context: int = 4096, device: str | None = None, tokens: float = 1e12,
          source: str = "an explicit config", prediction: Mapping[str, Any] | None = None,
          recipe_defaults: RecipeDefaults = RecipeDefaults(),
          costs: Mapping[str, Any] | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """Write config.json, model.yaml, recipe.yaml, costs.json and README.md into ``out_dir``
    (atomically, each file). Returns a summary with the paths and the costs.

    ``costs``: :func:`costs.cost_summary` of ``cfg`` at these precisions, context and device when
    the caller already holds it (a :class:`Candidate`'s costs); computed here otherwise.
    ``tokenizer``: ``byte``, ``bpe:N`` or a ``tokenizer.json`` path (copied into ``out_dir``),
    recorded in ``recipe.yaml``; its vocabulary must be ``cfg.vocab_size``."""
    hf = hf_config(cfg)                           # refuses before anything is written
    tok_file = None
    if tokenizer is not None:
        from moe_scaling.train.tokenizers import parse_tokenizer, tokenizer_vocab_size
        n = tokenizer_vocab_size(tokenizer, field="tokenizer")
        if n != cfg.vocab_size:
            raise ConfigError(f"tokenizer = {tokenizer!r}: has {n} ids but the model's vocab_size is "
                              f"{cfg.vocab_size}; build with --vocab {n} or use a tokenizer of {cfg.vocab_size} ids")
        if parse_tokenizer(tokenizer)[0] == "file":
            tok_file, tokenizer = Path(tokenizer).expanduser().read_text(), "tokenizer.json"
    if costs is None:
        costs = cost_summary(cfg, weights=weights, kv=kv, context=context, device=device)
    costs = dict(costs)
    recipe = make_recipe(cfg, tokens=tokens, weights=weights, kv=kv, defaults=recipe_defaults,
                         tokenizer=tokenizer)
    out = Path(out_dir)
    name = name or out.name
    files = {
        "config.json": json.dumps(hf, indent=2) + "\n",
        "model.yaml": yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False),
        "recipe.yaml": "# Four-stage recipe; every value is a stated default to tune, not a claim.\n"
                       + yaml.safe_dump(recipe, sort_keys=False),
        "costs.json": json.dumps(costs, indent=2) + "\n",
        "README.md": model_card(name, cfg, costs, recipe, source, prediction),
        **({"tokenizer.json": tok_file} if tok_file is not None else {}),
    }
    for fname, text in files.items():
        atomic_write_text(out / fname, text)
    return {"out": str(out), "files": sorted(files), "model_type": hf["model_type"],
            "params_total": costs["params_total"], "params_active": costs["params_active"],
            "costs": costs}


def build_from_fit(fit: LossModel, budget: Budget, out_dir: str | Path, *, space: ArchSpace = ArchSpace(),
                   method: str = "auto", seed: int = 0, level: float = 0.9, name: str | None = None,
                   source: str | None = None, tokenizer: str | None = None) -> tuple[SearchResult, dict[str, Any]]:
    """Search ``budget`` with ``fit``'s law over ``space`` and build the sweet spot into ``out_dir``.

    The model directory is costed on the budget's precisions, context and device, with the sweet
    spot's training tokens and prediction on the card; its costs are the sweet spot's own (one
    :func:`costs.cost_summary` call in all). Returns the :class:`SearchResult` and :func:`build`'s
    summary. Raises :class:`NothingFits` (nothing written) when no architecture meets the budget.
    """
    result = search(fit, budget, space, method=method, seed=seed, level=level)
    spot = result.sweet_spot
    if spot is None:
        raise NothingFits("budget: nothing in the space meets it; raise a budget")
    summary = build(spot.config, out_dir, name=name, weights=budget.weights, kv=budget.kv,
                    context=budget.context, device=budget.device, tokens=spot.tokens,
                    source=source or f"the sweet spot of a {budget.memory / 1e9:g} GB budget",
                    prediction=spot.to_dict(), costs=spot.costs, tokenizer=tokenizer)
    return result, summary
