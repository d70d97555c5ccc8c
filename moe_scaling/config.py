"""Typed, validated configuration: the model, the training run and the data.

Three frozen dataclasses carry every setting the rest of the package reads:

* :class:`ModelConfig`: the MobileMoE-style decoder (docs/design.md, section 2) and its sparsity
  vocabulary (section 3): ``granularity``, ``expansion``, ``sparsity``, ``activation_ratio``.
* :class:`TrainConfig`: optimiser, schedule, token budget, MoE runtime options, checkpoints.
* :class:`DataConfig`: corpus, tokenizer, sequence length, validation split.

(plus :class:`MeshShape`, the ``train.mesh`` value). The module is long (~550 lines) on purpose: it
is the one place that says what a run file means, and every validator sits beside its field; the
helpers that derive configs (``apply_granularity``, ``reference_d_ff``) belong to the same meaning.

Every config is validated when it is built. A bad value raises :class:`ConfigError` whose
one-line message names the field, the value and the fix, e.g.::

    model.top_k = 9: must be <= n_experts (8); lower top_k or raise n_experts

Configs round-trip through YAML and JSON (:func:`load_config`, :func:`save_config`). Hugging Face
``config.json`` files are read and written by :mod:`moe_scaling.hf.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_write_text

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "read_mapping",
    "load_config",
    "load_model_config",
    "apply_granularity",
    "reference_d_ff",
    "save_config",
    "MeshShape",
    "MESH_AXES",
]


def _fail(section: str, name: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{section}.{name} = {value!r}: {problem}; {fix}")


def _check_int(section: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(section, name, value, "must be an integer", f"give a whole number >= {minimum}")
    if value < minimum:
        _fail(section, name, value, f"must be >= {minimum}", f"give a whole number >= {minimum}")


def _check_number(section: str, name: str, value: Any, minimum: float | None = None,
                  maximum: float | None = None, strict_min: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(section, name, value, "must be a finite number", "give a number")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        rel = ">" if strict_min else ">="
        _fail(section, name, value, f"must be {rel} {minimum}", f"give a number {rel} {minimum}")
    if maximum is not None and value > maximum:
        _fail(section, name, value, f"must be <= {maximum}", f"give a number <= {maximum}")


def _check_bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(section, name, value, "must be true or false", "write true or false")


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, name, value, f"must be one of {', '.join(choices)}",
              f"pick one of {', '.join(choices)}")


def _reject_unknown(cls: type, data: Mapping[str, Any], section: str, extra: tuple[str, ...] = ()) -> None:
    """Raise a one-line :class:`ConfigError` for a key that is no field of ``cls``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a mapping of field: value, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names and key not in extra:
            close = difflib.get_close_matches(str(key), sorted(names | set(extra)), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(names))}"
            raise ConfigError(f"{section}.{key}: unknown field; {hint}")


# --------------------------------------------------------------------------------------
# ModelConfig
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A MobileMoE-style decoder-only transformer.

    Pre-norm blocks of RMSNorm -> GQA attention (RoPE, optional QK-norm) and RMSNorm -> FFN. The
    FFN of a layer is dense SwiGLU of width ``d_ff`` when ``n_experts <= 1`` or the layer is one of
    the first ``n_dense_layers``; otherwise it is an MoE block: a router over ``n_experts`` SwiGLU
    experts of width ``d_expert`` with top-``top_k`` selection, plus ``n_shared`` always-on shared
    SwiGLU experts of width ``d_shared`` (each), outputs summed.

    Defaults resolved at construction: ``head_dim = d_model // n_heads``,
    ``d_expert = d_ff`` (granularity 1), ``d_shared = d_expert``. ``ModelConfig.from_dict`` also
    accepts ``granularity: G`` in place of ``d_expert``, with the same meaning as in grid files
    (:func:`apply_granularity`: ``d_expert = d_ff / G`` and ``top_k = G * top_k``).

    Attributes beyond the published family knobs:
      shared_gate: each shared expert's output is scaled by ``sigmoid(x @ w_gate)`` (qwen2_moe).
      attn_bias: q/k/v projections carry a bias (qwen2, qwen2_moe).
      router_bias: sigmoid router with a per-expert selection-bias vector (glm4_moe/dots1
        ``e_score_correction_bias``); it is a buffer, not a trained parameter, and is not counted.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    n_experts: int = 1
    top_k: int = 1
    d_expert: int | None = None
    n_shared: int = 0
    d_shared: int | None = None
    n_dense_layers: int = 0
    tie_embeddings: bool = True
    qk_norm: bool = True
    router: str = "softmax"
    norm_topk: bool = True
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    shared_gate: bool = False
    attn_bias: bool = False
    router_bias: bool = False

    def __post_init__(self) -> None:
        s = "model"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_int(s, name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check_int(s, "n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            _fail(s, "n_kv_heads", self.n_kv_heads,
                  f"must divide n_heads ({self.n_heads}) for grouped-query attention",
                  "pick a divisor of n_heads")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                _fail(s, "n_heads", self.n_heads,
                      f"must divide d_model ({self.d_model}) when head_dim is not given",
                      "pick a divisor of d_model or set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _check_int(s, "head_dim", self.head_dim)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        _check_int(s, "d_ff", self.d_ff)
        _check_int(s, "n_experts", self.n_experts)
        _check_int(s, "top_k", self.top_k)
        if self.is_moe and self.top_k > self.n_experts:
            _fail(s, "top_k", self.top_k, f"must be <= n_experts ({self.n_experts})",
                  "lower top_k or raise n_experts")
        if self.d_expert is None:
            object.__setattr__(self, "d_expert", self.d_ff)
        _check_int(s, "d_expert", self.d_expert)
        _check_int(s, "n_shared", self.n_shared, minimum=0)
        if self.d_shared is None:
            object.__setattr__(self, "d_shared", self.d_expert)
        _check_int(s, "d_shared", self.d_shared)
        _check_int(s, "n_dense_layers", self.n_dense_layers, minimum=0)
        if self.n_dense_layers > self.n_layers:
            _fail(s, "n_dense_layers", self.n_dense_layers, f"must be <= n_layers ({self.n_layers})",
                  "lower n_dense_layers")
        for name in ("tie_embeddings", "qk_norm", "norm_topk", "shared_gate", "attn_bias",
                     "router_bias"):
            _check_bool(s, name, getattr(self, name))
        _check_choice(s, "router", self.router, ("softmax", "sigmoid"))
        if self.router_bias and self.router != "sigmoid":
            _fail(s, "router_bias", self.router_bias, "needs router: sigmoid",
                  "set router: sigmoid or router_bias: false")
        _check_number(s, "rope_theta", self.rope_theta, minimum=0.0, strict_min=True)
        if isinstance(self.rope_theta, int):
            object.__setattr__(self, "rope_theta", float(self.rope_theta))

    # -- derived sparsity vocabulary (docs/design.md, section 3) --------------------------------
    @property
    def is_moe(self) -> bool:
        """True when the FFN of the non-dense layers is a mixture of experts."""
        return self.n_experts > 1

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.is_moe else 0

    @property
    def granularity(self) -> float:
        """G = d_ff / d_expert (1 for a dense model)."""
        return self.d_ff / self.d_expert if self.is_moe else 1.0

    @property
    def expansion(self) -> float:
        """E = n_experts / G: total routed expert width over d_ff (1 for a dense model)."""
        return self.n_experts / self.granularity if self.is_moe else 1.0

    @property
    def sparsity(self) -> float:
        """S = 1 - top_k / n_experts (0 for a dense model)."""
        return 1.0 - self.top_k / self.n_experts if self.is_moe else 0.0

    @property
    def activation_ratio(self) -> float:
        """A = (top_k + n_shared) / (n_experts + n_shared) (1 for a dense model)."""
        if not self.is_moe:
            return 1.0
        return (self.top_k + self.n_shared) / (self.n_experts + self.n_shared)

    @property
    def d_active_ffn(self) -> int:
        """FFN width a token passes through in an MoE layer: top_k * d_expert + shared width."""
        if not self.is_moe:
            return self.d_ff
        return self.top_k * self.d_expert + self.n_shared * self.d_shared

    def dense_twin(self) -> "ModelConfig":
        """The equal-active dense model: FFN width top_k * d_expert + n_shared * d_shared."""
        return dataclasses.replace(self, n_experts=1, top_k=1, d_ff=self.d_active_ffn,
                                   d_expert=None, n_shared=0, d_shared=None, n_dense_layers=0,
                                   shared_gate=False, router_bias=False)

    # -- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        _reject_unknown(cls, data, "model", extra=("granularity",))
        data = dict(data)
        if "granularity" in data:
            apply_granularity(data, data.pop("granularity"))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            if name not in data:
                raise ConfigError(f"model.{name}: missing required field; add {name}: <integer>")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_d_ff(model: Mapping[str, Any], where: str = "model") -> int:
    """The dense reference FFN width of a model mapping: ``d_ff``, else ``4 * d_model`` (checked to
    be a whole number; errors start with ``where``)."""
    d_ff = model.get("d_ff")
    if d_ff is None:
        d_model = model.get("d_model")
        if isinstance(d_model, bool) or not isinstance(d_model, int):
            raise ConfigError(f"{where}: model.d_model = {d_model!r}: needed as a whole number to "
                              "resolve granularity/expansion; set model.d_model or model.d_ff")
        d_ff = 4 * d_model
    if isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff < 1:
        raise ConfigError(f"{where}: model.d_ff = {d_ff!r}: must be a whole number >= 1; fix d_ff")
    return d_ff


def apply_granularity(model: dict[str, Any], g: Any, where: str = "model.granularity") -> None:
    """Resolve ``granularity: G`` in a model mapping, in place: the one meaning of the key in run
    files and grid files (docs/design.md, section 3).

    G splits each coarse expert into G experts of width ``d_ff / G`` at fixed active compute:
    ``d_expert = d_ff / G`` and ``top_k = G * top_k``, where the written ``top_k`` is the coarse
    top-k at G = 1; shared experts keep the coarse width (``d_shared = d_ff`` unless given). The
    active FFN width ``top_k * d_expert + n_shared * d_shared`` is therefore the same at every G.
    ``d_ff`` defaults to ``4 * d_model``. ``where`` names the key in errors (a grid adds its run label).
    """
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ConfigError(f"{where} = {g!r}: must be a whole number >= 1; use 1, 2, 4, 8, ...")
    if model.get("d_expert") is not None:
        raise ConfigError(f"{where} = {g!r}: given together with d_expert = {model['d_expert']!r}; "
                          "give only one of granularity and d_expert")
    d_ff = reference_d_ff(model, where)
    if d_ff % g:
        raise ConfigError(f"{where} = {g!r}: must divide d_ff ({d_ff}) into whole expert widths; "
                          "pick a divisor of d_ff")
    top_k = model.get("top_k", 1)
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        model["top_k"] = g * top_k
    model["d_expert"] = d_ff // g
    model.setdefault("d_shared", d_ff)


# --------------------------------------------------------------------------------------
# TrainConfig and DataConfig
# --------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "expert")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the ``data``, ``fsdp`` and ``expert`` axes of a device mesh (``TrainConfig.mesh``,
    ``--mesh``; how they are used: :mod:`moe_scaling.train.mesh`)."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1

    @classmethod
    def parse(cls, text: str | None, field: str = "train.mesh") -> "MeshShape":
        """``"data=2,expert=2"`` -> ``MeshShape(2, 1, 2)``; ``None`` or ``""`` -> one device."""
        if text is None or str(text).strip() == "":
            return cls()
        sizes: dict[str, int] = {}
        for part in str(text).split(","):
            m = re.fullmatch(r"\s*([a-z]+)\s*=\s*(\d+)\s*", part)
            if not m or m[1] not in MESH_AXES:
                raise ConfigError(f"{field} = {text!r}: {part.strip()!r} is not AXIS=SIZE with AXIS one of "
                                  f"{', '.join(MESH_AXES)}; write e.g. data=2,fsdp=2,expert=2")
            if m[1] in sizes:
                raise ConfigError(f"{field} = {text!r}: axis {m[1]} given twice; give each axis once")
            if int(m[2]) < 1:
                raise ConfigError(f"{field} = {text!r}: axis {m[1]} has size 0; sizes are whole numbers >= 1")
            sizes[m[1]] = int(m[2])
        return cls(**sizes)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.expert

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.expert)

    def __str__(self) -> str:
        return f"data={self.data},fsdp={self.fsdp},expert={self.expert}"


DISPATCHES = ("auto", "reference", "capacity", "dropless", "ragged")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: token budget, AdamW, LR schedule, MoE losses and runtime, checkpoints.

    ``tokens`` is the total number of training tokens; the number of steps is
    ``tokens // (batch_size * seq_len)`` (``seq_len`` from :class:`DataConfig`).
    ``warmup`` is a fraction of the steps when < 1, else a step count. ``schedule`` is
    ``cosine`` (warmup then cosine to ``min_lr_ratio * lr``), ``wsd`` (warmup, stable, then a
    linear decay over the last ``decay_fraction`` of steps) or ``constant`` (after warmup).
    ``bias_update_rate`` is the step ``u`` of the auxiliary-loss-free load balancing of MoE
    layers with a router bias (``model.router_bias``): after every optimiser step each expert's
    selection bias moves by ``+u`` if it received fewer tokens than the mean in that step's
    batch, ``-u`` if more (DeepSeek-V3 used 0.001); 0 keeps the bias fixed. Models without a
    router bias ignore it.

    ``mesh`` places the run on a device mesh, ``data=D,fsdp=F,expert=X`` (missing axes are 1;
    :mod:`moe_scaling.train.mesh`); ``None`` (the default) is one device. It says where the run
    computes, not what: a checkpoint restores on any mesh, and :meth:`to_dict` leaves it out
    while it is ``None`` so that run ids of single-device runs do not change.
    ``dtype`` is the compute dtype of the matmuls: ``bfloat16`` is mixed precision (parameters,
    gradients and AdamW moments stay float32; norms, router, softmaxes and logits float32).
    """

    tokens: int = 1_000_000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 1e-3
    capacity_factor: float = 1.25
    dispatch: str = "auto"
    dtype: str = "float32"
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    mesh: str | None = None

    def __post_init__(self) -> None:
        s = "train"
        _check_int(s, "tokens", self.tokens)
        _check_int(s, "batch_size", self.batch_size)
        _check_number(s, "lr", self.lr, minimum=0.0, strict_min=True)
        _check_number(s, "min_lr_ratio", self.min_lr_ratio, minimum=0.0, maximum=1.0)
        _check_number(s, "warmup", self.warmup, minimum=0.0)
        _check_choice(s, "schedule", self.schedule, SCHEDULES)
        _check_number(s, "decay_fraction", self.decay_fraction, minimum=0.0, maximum=1.0)
        _check_number(s, "weight_decay", self.weight_decay, minimum=0.0)
        _check_number(s, "beta1", self.beta1, minimum=0.0, maximum=1.0)
        _check_number(s, "beta2", self.beta2, minimum=0.0, maximum=1.0)
        _check_number(s, "eps", self.eps, minimum=0.0, strict_min=True)
        _check_number(s, "grad_clip", self.grad_clip, minimum=0.0)
        _check_number(s, "aux_loss_coef", self.aux_loss_coef, minimum=0.0)
        _check_number(s, "z_loss_coef", self.z_loss_coef, minimum=0.0)
        _check_number(s, "bias_update_rate", self.bias_update_rate, minimum=0.0)
        _check_number(s, "capacity_factor", self.capacity_factor, minimum=0.0, strict_min=True)
        _check_choice(s, "dispatch", self.dispatch, DISPATCHES)
        _check_choice(s, "dtype", self.dtype, ("float32", "bfloat16"))
        for name in ("eval_every", "eval_batches", "ckpt_every", "log_every"):
            _check_int(s, name, getattr(self, name))
        _check_int(s, "seed", self.seed, minimum=0)
        if self.mesh is not None:
            if not isinstance(self.mesh, str):
                _fail(s, "mesh", self.mesh, "must be a string", "write e.g. data=2,fsdp=2,expert=2")
            MeshShape.parse(self.mesh, field="train.mesh")

    @property
    def mesh_shape(self) -> "MeshShape":
        """``mesh`` parsed (one device when ``None``)."""
        return MeshShape.parse(self.mesh)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        _reject_unknown(cls, data, "train")
        data = dict(data)
        if isinstance(data.get("tokens"), float) and float(data["tokens"]).is_integer():
            data["tokens"] = int(data["tokens"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["mesh"] is None:
            del d["mesh"]
        return d

    def steps(self, seq_len: int) -> int:
        """Number of optimiser steps for this token budget at ``seq_len`` tokens per row."""
        n = self.tokens // (self.batch_size * seq_len)
        if n < 1:
            raise ConfigError(f"train.tokens = {self.tokens}: fewer than one batch "
                              f"({self.batch_size} x {seq_len} tokens); raise tokens")
        return n


@dataclass(frozen=True)
class DataConfig:
    """The text a run trains on.

    ``corpus`` is ``stdlib`` (the Python standard library's own source, embedded on every
    machine), a path to a ``.txt``/``.jsonl``/``.npy`` file, a directory or a glob of them.
    ``tokenizer`` is ``byte`` (vocabulary 256, no download), ``bpe:N`` (a byte-level BPE of N
    ids trained on the corpus and cached) or the path of a Hugging Face ``tokenizer.json``
    (:mod:`moe_scaling.train.tokenizers`). ``valid_fraction`` of the tokens
    (taken from the end, deterministically) is held out for evaluation. ``max_tokens`` caps the
    corpus size (the first tokens are kept) for quick runs.
    """

    corpus: str = "stdlib"
    tokenizer: str = "byte"
    seq_len: int = 128
    valid_fraction: float = 0.05
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        s = "data"
        if not isinstance(self.corpus, str) or not self.corpus:
            _fail(s, "corpus", self.corpus, "must be a non-empty string",
                  "give 'stdlib', a file, a directory or a glob")
        if not isinstance(self.tokenizer, str) or not (
                self.tokenizer == "byte" or self.tokenizer.endswith(".json")
                or (re.fullmatch(r"bpe:\d+", self.tokenizer) and int(self.tokenizer[4:]) >= 257)):
            _fail(s, "tokenizer", self.tokenizer, "must be byte, bpe:N (N >= 257) or a tokenizer.json path",
                  "write e.g. tokenizer: bpe:8192")
        _check_int(s, "seq_len", self.seq_len, minimum=2)
        _check_number(s, "valid_fraction", self.valid_fraction, minimum=0.0, maximum=0.5,
                      strict_min=True)
        if self.max_tokens is not None:
            _check_int(s, "max_tokens", self.max_tokens, minimum=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataConfig":
        _reject_unknown(cls, data, "data")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML or JSON file (``.json`` is JSON), or a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; check the path")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"({first}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Load a :class:`ModelConfig` from our YAML/JSON (top-level or under ``model:``).

    A Hugging Face ``config.json`` (it has a ``model_type`` key) is refused with a pointer to
    :func:`moe_scaling.hf.config.read_model_config`, which reads both."""
    data = read_mapping(path)
    if "model_type" in data:
        raise ConfigError(f"{path}: a Hugging Face config.json (model_type {data['model_type']!r}); "
                          "read it with moe_scaling.hf.config.read_model_config")
    if "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    return ModelConfig.from_dict(data)


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Load a run file with ``model:``, ``train:`` and ``data:`` sections (train/data optional)."""
    data = read_mapping(path)
    for key in data:
        if key not in ("model", "train", "data"):
            raise ConfigError(f"{path}: unknown section {key!r}; use model, train and data")
    if "model" not in data:
        raise ConfigError(f"{path}: missing section 'model'; add model: {{...}}")
    return (ModelConfig.from_dict(data["model"]), TrainConfig.from_dict(data.get("train") or {}),
            DataConfig.from_dict(data.get("data") or {}))


def save_config(path: str | os.PathLike, model: ModelConfig, train: TrainConfig | None = None,
                data: DataConfig | None = None) -> None:
    """Save configs as YAML (``.yaml``/``.yml``) or JSON (``.json``), atomically."""
    doc: dict[str, Any] = {"model": model.to_dict()}
    if train is not None:
        doc["train"] = train.to_dict()
    if data is not None:
        doc["data"] = data.to_dict()
    path = Path(path)
    text = (json.dumps(doc, indent=2) + "\n") if path.suffix == ".json" else yaml.safe_dump(doc, sort_keys=False)
    atomic_write_text(path, text)
