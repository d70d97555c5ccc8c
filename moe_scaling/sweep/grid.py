"""Grid files: a YAML sweep specification expanded into fully resolved, validated runs.

A grid file names base configs and the axes to vary::

    name: example
    data:  {corpus: stdlib, seq_len: 128}            # any DataConfig field
    model: {d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 256}   # ModelConfig base
    train: {tokens: 500000, batch_size: 16, lr: 0.003}                        # TrainConfig base
    grid:  {n_experts: [4, 8, 16], top_k: [1, 2], n_shared: [0, 1]}           # cartesian product
    zip:   {d_model: [64, 128], n_layers: [2, 4]}    # optional: axes varied together
    exclude: ["top_k > n_experts"]                    # optional: expressions over resolved fields
    seeds: [0]                                        # optional (sets train.seed)

Expansion order: the cartesian product of the ``grid`` axes (in file order, the last axis varying
fastest), times the rows of ``zip`` (all lists of equal length), times ``seeds``. An axis name is
any field of ModelConfig, TrainConfig or DataConfig, written plainly (``lr``) or with its section
(``train.lr``), or one of the derived axes below. A run's id is a hash of its resolved
(model, train, data) config, seed included; two points that resolve to the same config are one run.

Derived axes (docs/design.md, section 3), usable in ``grid``, ``zip`` or the ``model`` base:

* ``granularity: G`` (a whole number >= 1) splits each expert into G finer ones at fixed active
  compute: ``d_expert = d_ff / G`` (G must divide d_ff), ``top_k = G * top_k`` (the ``top_k``
  written in the file is the coarse top-k at granularity 1), and shared experts keep the coarse
  width ``d_shared = d_ff`` unless ``d_shared`` is given. So active FFN width per token
  ``top_k * d_expert + n_shared * d_shared`` does not change with G. ``granularity`` cannot be given
  together with ``d_expert``.
* ``expansion: E`` sets ``n_experts = E * G`` (G = 1 when no granularity is given), i.e. the total
  routed expert width is E times d_ff. ``E * G`` must be a whole number; ``expansion`` cannot be given
  together with ``n_experts``. ``expansion: 1`` at granularity 1 is the dense model.
* ``shared_fraction: f`` (0 < f < 1): in runs with shared experts (``n_shared >= 1``), the shared
  experts take the share f of the routed active width ``W = top_k * d_expert`` instead of adding to
  it: ``d_shared = f W / n_shared`` and ``top_k = (1 - f) W / d_expert`` (both whole), so the active
  FFN width stays W and a shared expert is compared at equal compute (MobileMoE-L: f = 1/2, top-4
  of 8 fine experts' width plus a shared expert of half d_ff). Runs without shared experts are
  unchanged.

Without ``expansion``, ``n_experts`` is taken literally (the number of experts after splitting).

``exclude`` expressions drop points before validation. They see every resolved field by its plain
name (``n_experts``, ``top_k``, ``d_expert``, ``lr``, ``seq_len``, ``seed``, ...) plus ``granularity``,
``expansion``, ``sparsity`` and ``activation_ratio``, and may use only names, numbers, strings,
``True``/``False``/``None``, comparisons, ``and``/``or``/``not`` and arithmetic (``+ - * / // % **``).
They are interpreted by :mod:`moe_scaling.sweep.exclude`, never passed to ``eval``, with every
intermediate value bounded; anything else (calls, attributes, subscripts, lambdas, comprehensions,
...) is rejected as unsafe.

``vocab_size`` defaults to the tokenizer's vocabulary (256 for ``byte``). A relative ``corpus`` path
is resolved against the grid file's folder when the run trains; the run id uses it as written.
Every resolved run is validated when the grid is expanded; the first bad one raises a
:class:`ConfigError` whose one line names the run, the field and the value.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from moe_scaling.config import apply_granularity, reference_d_ff, DataConfig, ModelConfig, TrainConfig
from moe_scaling.costs import flops_per_token
from moe_scaling.errors import ConfigError
from moe_scaling.sweep.exclude import DERIVED_PROPERTIES, compile_exclude, did_you_mean
from moe_scaling.train.datasets_corpus import HF_PREFIX

__all__ = ["GridSpec", "RunSpec", "load_grid", "expand_grid", "run_id", "resolve_corpus", "namespace",
           "DERIVED_AXES"]

SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
DERIVED_AXES = ("granularity", "expansion", "shared_fraction")
TOKENIZER_VOCAB = {"byte": 256}
TOP_KEYS = ("name", "data", "model", "train", "grid", "zip", "exclude", "seeds")

_FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in fields(cls)}


# --------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file (see the module docstring). Axis keys are ``section.field`` or a derived
    axis name; base sections map field -> value."""

    name: str
    path: Path
    model: Mapping[str, Any]
    train: Mapping[str, Any]
    data: Mapping[str, Any]
    grid: Mapping[str, list]
    zip: Mapping[str, list]
    exclude: tuple[str, ...]
    seeds: tuple[int, ...] | None


@dataclass(frozen=True)
class RunSpec:
    """One resolved run of a sweep: validated configs plus the axis values that produced it."""

    run_id: str
    index: int
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    axes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``run 3 (n_experts=8, top_k=2)``: how errors and progress lines name the run."""
        return _label(self.index, self.axes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (JSON-safe): ``{"model": ..., "train": ..., "data": ...}``."""
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int = 0,
                  axes: Mapping[str, Any] | None = None) -> "RunSpec":
        model = ModelConfig.from_dict(data["model"])
        train = TrainConfig.from_dict(data["train"])
        dcfg = DataConfig.from_dict(data["data"])
        return cls(run_id(model, train, dcfg), index, model, train, dcfg, dict(axes or {}))


def run_id(model: ModelConfig, train: TrainConfig, data: DataConfig) -> str:
    """Deterministic 12-hex-digit id: SHA-256 of the canonical JSON of the resolved configs."""
    doc = {"model": model.to_dict(), "train": train.to_dict(), "data": data.to_dict()}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _label(index: int, axes: Mapping[str, Any]) -> str:
    inner = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in axes.items())
    return f"run {index} ({inner})" if inner else f"run {index}"


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_grid(path: str | os.PathLike) -> GridSpec:
    """Parse and check the structure of a grid file (values are checked by :func:`expand_grid`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such grid file; check the path")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"{path}: not valid YAML ({first}); fix the syntax") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}{did_you_mean(key, TOP_KEYS)}; "
                              f"use {', '.join(TOP_KEYS)}")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"name = {name!r}: must be a non-empty string of letters, digits, -, _ or .; "
                          "rename the sweep")

    bases = {}
    for section in SECTIONS:
        base = doc.get(section) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{section}: expected a mapping of field: value, got {type(base).__name__}")
        allowed = DERIVED_AXES if section == "model" else ()
        for key in base:
            if key not in {f.name for f in fields(SECTIONS[section])} and key not in allowed:
                names = [f.name for f in fields(SECTIONS[section])] + list(allowed)
                raise ConfigError(f"{section}.{key}: unknown field{did_you_mean(key, names)}")
        bases[section] = dict(base)

    axes: dict[str, dict[str, list]] = {}
    for kind in ("grid", "zip"):
        block = doc.get(kind) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{kind}: expected a mapping of axis: [values], got {type(block).__name__}")
        axes[kind] = {}
        for key, values in block.items():
            axis = _axis_key(kind, key)
            if axis in axes["grid"] or axis in axes[kind]:
                raise ConfigError(f"{kind}.{key}: axis given twice; vary each field in one place")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{kind}.{key} = {values!r}: must be a non-empty list of values; "
                                  f"write {key}: [v1, v2]")
            axes[kind][axis] = values
    lengths = {len(v) for v in axes["zip"].values()}
    if len(lengths) > 1:
        detail = ", ".join(f"{k.split('.')[-1]}: {len(v)}" for k, v in axes["zip"].items())
        raise ConfigError(f"zip: lists must have equal lengths ({detail}); make them the same length")

    exclude = doc.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise ConfigError(f"exclude = {exclude!r}: must be a list of expression strings; "
                          "write exclude: [\"top_k > n_experts\"]")
    for i, expr in enumerate(exclude):
        compile_exclude(expr, where=f"exclude[{i}]")

    seeds = doc.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise ConfigError(f"seeds = {seeds!r}: must be a non-empty list of whole numbers >= 0; "
                              "write seeds: [0, 1]")
        if "train.seed" in axes["grid"] or "train.seed" in axes["zip"] or "seed" in bases["train"]:
            raise ConfigError("seeds: given together with a train.seed axis or base value; give one")
        seeds = tuple(seeds)
    return GridSpec(name=name, path=path, model=bases["model"], train=bases["train"],
                    data=bases["data"], grid=axes["grid"], zip=axes["zip"], exclude=tuple(exclude),
                    seeds=seeds)


def _axis_key(kind: str, key: Any) -> str:
    """Canonical axis key: ``section.field`` or a derived axis name."""
    key = str(key)
    plain = key.removeprefix("model.")
    if plain in DERIVED_AXES:
        return plain
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in {f.name for f in fields(SECTIONS[section])}:
            return key
    elif key in _FIELD_SECTION:
        return f"{_FIELD_SECTION[key]}.{key}"
    known = list(_FIELD_SECTION) + list(DERIVED_AXES)
    raise ConfigError(f"{kind}.{key}: unknown field{did_you_mean(key.split('.')[-1], known)}")


# --------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------


def expand_grid(spec: GridSpec, check_corpus: bool = True, only: str | None = None) -> list[RunSpec]:
    """Resolve every point of ``spec`` into a validated :class:`RunSpec` (excluded points dropped,
    identical configs merged). Raises :class:`ConfigError` naming the run, field and value of the
    first invalid point; with ``check_corpus`` a corpus path that matches no file is an error too.

    ``only``: an expression in ``exclude``'s language; the runs for which it is false are left out
    after validation, keeping their place in the numbering (so a run's index and label are the
    same as in the whole grid): how a large study is trained in an order of one's choosing, e.g.
    its smallest budget first (``moe-sweep run --only``)."""
    excludes = [compile_exclude(expr, where=f"exclude[{i}]") for i, expr in enumerate(spec.exclude)]
    keep = compile_exclude(only, where="--only") if only is not None else None
    grid_keys = list(spec.grid)
    zip_rows = [dict(zip(spec.zip, row)) for row in zip(*spec.zip.values())] or [{}]
    seeds = spec.seeds if spec.seeds is not None else (None,)
    runs: list[RunSpec] = []
    seen: set[str] = set()
    index = 0
    for combo in itertools.product(*(spec.grid[k] for k in grid_keys)):
        for zrow in zip_rows:
            for seed in seeds:
                axes = dict(zip(grid_keys, combo)) | zrow
                if seed is not None and len(seeds) > 1:
                    axes["train.seed"] = seed
                label = _label(index, axes)
                sections = _assign(spec, axes, seed, label)
                env = namespace(sections) if excludes or keep else {}
                if any(fn(env, label) for fn in excludes):
                    continue
                run = _build(sections, index, axes, label)
                if check_corpus:
                    _check_corpus(run, spec.path.parent, label)
                index += 1
                if keep is not None and not keep(env, label):
                    continue
                if run.run_id not in seen:
                    seen.add(run.run_id)
                    runs.append(run)
    if not runs:
        if keep is not None:
            raise ConfigError(f"--only = {only!r}: matches no run of {spec.path}; check the expression "
                              "against the grid's values (moe-sweep validate lists them)")
        raise ConfigError(f"{spec.path}: the grid has no runs left after exclude; loosen exclude")
    return runs


def _assign(spec: GridSpec, axes: Mapping[str, Any], seed: int | None,
            label: str) -> dict[str, dict[str, Any]]:
    """Base sections + axis values, with the derived axes resolved into real fields."""
    out = {s: dict(getattr(spec, s)) for s in SECTIONS}
    derived = {k: out["model"].pop(k) for k in DERIVED_AXES if k in out["model"]}
    explicit = set(out["model"])
    for key, value in axes.items():
        if key in DERIVED_AXES:
            derived[key] = value
        else:
            section, name = key.split(".", 1)
            out[section][name] = value
            if section == "model":
                explicit.add(name)
    if seed is not None:
        out["train"]["seed"] = seed
    model = out["model"]
    tokenizer = out["data"].get("tokenizer", "byte")
    if "vocab_size" not in model and tokenizer in TOKENIZER_VOCAB:
        model["vocab_size"] = TOKENIZER_VOCAB[tokenizer]
    g = derived.get("granularity")
    if g is not None:
        apply_granularity(model, g, where=f"{label}: granularity")
    e = derived.get("expansion")
    if e is not None:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0:
            raise ConfigError(f"{label}: expansion = {e!r}: must be a number > 0; use 1, 2, 4, ...")
        if "n_experts" in explicit:
            raise ConfigError(f"{label}: expansion = {e!r}: given together with n_experts = "
                              f"{model['n_experts']!r}; give only one of them")
        g_eff = g if g is not None else reference_d_ff(model, label) / (model.get("d_expert") or reference_d_ff(model, label))
        n = e * g_eff
        if not math.isclose(n, round(n)) or round(n) < 1:
            raise ConfigError(f"{label}: expansion = {e!r}: expansion * granularity = {n:g} is not a "
                              "whole number of experts; pick values whose product is whole")
        model["n_experts"] = int(round(n))
    f = derived.get("shared_fraction")
    if f is not None:
        _apply_shared_fraction(model, f, label)
    return out


def _apply_shared_fraction(model: dict[str, Any], f: Any, label: str) -> None:
    """``shared_fraction: f`` (module docstring), in place; a no-op without shared experts."""
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise ConfigError(f"{label}: shared_fraction = {f!r}: must be a number in (0, 1), e.g. 0.5")
    n_shared = model.get("n_shared", 0)
    if not n_shared:
        return
    d_ff = reference_d_ff(model, label)
    d_expert = model.get("d_expert") or d_ff
    width = model.get("top_k", 1) * d_expert
    top_k, d_shared = (1 - f) * width / d_expert, f * width / n_shared
    # not whole: kept as computed, so that `exclude` can drop the point; otherwise the config's own
    # validation names top_k or d_shared and the value
    whole = lambda v: int(round(v)) if math.isclose(v, round(v)) else v  # noqa: E731
    model["top_k"], model["d_shared"] = whole(top_k), whole(d_shared)


def _build(sections: Mapping[str, dict], index: int, axes: Mapping[str, Any], label: str) -> RunSpec:
    try:
        return RunSpec.from_dict(sections, index=index, axes=axes)
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
    except TypeError as err:  # a wrongly typed value the dataclass could not take
        raise ConfigError(f"{label}: {err}; fix the value") from None


def _check_corpus(run: RunSpec, base: Path, label: str) -> None:
    corpus = run.data.corpus
    if not on_disk(corpus):                                    # a Hub dataset is checked when it loads
        return
    if not glob.glob(str(resolve_corpus(corpus, base))):
        raise ConfigError(f"{label}: data.corpus = {corpus!r}: matches no file (relative paths are "
                          f"read from {base}); fix the path")


def on_disk(corpus: str) -> bool:
    """True when ``corpus`` names files on disk: not the embedded ``stdlib`` text, not an ``hf:``
    dataset."""
    return corpus != "stdlib" and not corpus.startswith(HF_PREFIX)


def resolve_corpus(corpus: str, base: str | os.PathLike) -> str:
    """A corpus path as the trainer should read it: relative paths are taken from ``base``
    (the grid file's folder); ``stdlib``, ``hf:`` datasets and absolute paths are returned unchanged."""
    if not on_disk(corpus) or os.path.isabs(corpus):
        return corpus
    return os.path.normpath(os.path.join(os.path.abspath(base), corpus))


def namespace(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The names an exclude expression sees for one point: every field (with config defaults),
    plus granularity, expansion, sparsity, activation_ratio and ``train_compute`` (3 x forward
    FLOPs per token at the training context x tokens; only for points that validate). Works on
    invalid points too, so that exclude can drop a point that would not validate."""
    try:
        run = RunSpec.from_dict(sections)
        env = run.model.to_dict() | run.train.to_dict() | run.data.to_dict()
        env.update({p: getattr(run.model, p) for p in DERIVED_PROPERTIES})
        env["train_compute"] = 3.0 * flops_per_token(run.model, run.data.seq_len) * run.train.tokens
        return env
    except (ConfigError, TypeError, ValueError):
        pass
    env: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            if f.default is not dataclasses.MISSING:
                env[f.name] = f.default
        env.update(sections.get(name, {}))
    try:  # the defaults ModelConfig would derive; best effort on values that do not validate
        env["n_kv_heads"] = env.get("n_kv_heads") or env.get("n_heads")
        env["d_ff"] = env.get("d_ff") or 4 * env["d_model"]
        env["d_expert"] = env.get("d_expert") or env["d_ff"]
        env["d_shared"] = env.get("d_shared") or env["d_expert"]
        moe = env["n_experts"] > 1
        env["granularity"] = env["d_ff"] / env["d_expert"] if moe else 1.0
        env["expansion"] = env["n_experts"] / env["granularity"] if moe else 1.0
        env["sparsity"] = 1.0 - env["top_k"] / env["n_experts"] if moe else 0.0
        env["activation_ratio"] = ((env["top_k"] + env["n_shared"]) / (env["n_experts"] + env["n_shared"])
                                   if moe else 1.0)
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    return env
