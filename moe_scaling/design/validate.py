"""The closed loop: train what the search predicts and check the prediction (``moe-fit --validate``).

:func:`validation_candidates` takes a fitted law and a budget at a study's scale and names the
architectures worth training: the search's ``optimum`` (the law's argmin over the whole space,
granularity and shared experts included, when the law reads them), the two next-best architectures
(``runner_up_1``, ``runner_up_2``: the best point of the two next-best (trunk, layout) lines), and
the named alternatives, each the best point of its kind: ``best_dense``; ``coarse_g1``, ``g2`` and
``finest_g`` (G = 1, G = 2, the space's largest G); ``with_shared`` and ``no_shared``; and
``over_sparse`` (more than the optimum's expansion and at least 4x it, or the space's maximum).
When the law cannot read a knob, the optimum and runners-up keep it at the space's preferred layout,
as :func:`~moe_scaling.design.search.search` does, and the alternatives, which may use any layout,
test exactly what the law ignores. An alternative whose model is already listed is not repeated: the
listed candidate's ``also`` names it (so every role of the list is accounted for).

:func:`validate` writes them as a grid file (one ``zip`` row per candidate, every ModelConfig field
explicit, tokens from the budget's training compute rounded to whole steps, ``seeds``), trains it
with the sweep runner (:func:`moe_scaling.sweep.runner.run_sweep`, so crashes resume) and writes
``DIR/validation.json``::

    {"budget", "candidates": [{"name", "role", "also", "model", "predicted_loss", "interval", "tokens",
     "epochs", "measured", "measured_mean", "measured_std", "in_interval"}], "noise_floor", "spearman",
     "predicted_best_is_measured_best", "within_interval", "optimum_gap", "concordance",
     "extrapolation", "binding", "memory_use", "space_bounds", "depth_rule", "grid", "sweep"}

``epochs`` are a candidate's training tokens over the corpus's training split (windows are drawn at
random, so a token is seen that many times on average; many epochs, which short studies never
reach, lower what a law fitted on fewer predicts); ``measured`` are the final eval losses of the seeds; ``noise_floor`` the pooled seed-to-seed
standard deviation over candidates (each weighted by its degrees of freedom; None with one seed); ``spearman`` the
rank correlation of predicted loss and measured mean over candidates; ``interval`` the law's
interval at ``level`` for the mean of the seeds trained (:meth:`~moe_scaling.laws.fit.Fit.predict_interval`:
parameter uncertainty and the seed noise of the fit's runs of its family, dense or MoE, over sqrt(seeds)), and ``within_interval`` the share
of candidates whose measured mean lies in it (None when the law has none); ``optimum_gap`` the
optimum's measured mean minus the best measured mean; ``concordance`` the share of candidate pairs
whose measured means differ by more than 2 noise floors that the law orders the same way (None
when no pair does); ``extrapolation`` the budget's training compute over the largest the law was
fitted on, both under the budget's compute rule (the fit's ``max_train_compute``); ``binding`` the budgets that bind the optimum
(``memory``, ``flops_per_token``, ``latency_ms``; ``space`` when none does), ``memory_use`` its
share of the memory budget, ``depth_rule`` the (d_model, n_layers) pairs depth followed (``--like``: the
study's; None when depth was searched), ``space_bounds`` the search-space bounds it sits on (``d_model_min``,
``n_layers_max``, ``expansion_max``, ...), and ``verdict`` (:func:`verdict`): ``{"passed", "unmet"}``
against issue 23's item-5 targets, each unmet target named with its value.

The targets (:func:`verdict`): ``optimum_gap`` at most one noise floor (the law's optimum is as good as
the best candidate, within the seed noise), ``concordance`` at least 0.9, ``within_interval`` at least
0.8, and a budget, not the search space, binding the optimum: memory or decode latency in ``binding``,
at least 90% of the memory budget used unless latency binds, no ``space_bounds``. A planned loop
(``--plan``) is judged on the last three alone: the way to choose budgets before training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.design.candidate import Candidate, LossModel, config_columns, describe
from moe_scaling.design.search import NothingFits, _Evaluator, law_reads, search
from moe_scaling.design.space import ArchSpace, Budget, expert_line, layouts, space_bounds, trunks
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_write_text, json_default

__all__ = ["STUDY_SPACE", "STUDY_MODEL", "STUDY_TRAIN", "StudySettings", "study_settings", "Named", "validation_candidates", "summarize", "concordance", "verdict",
           "space_bounds", "where_it_binds", "validate", "model_shape"]

STUDY_SPACE = ArchSpace(vocab_size=256, d_model_min=32, d_model_max=128, d_model_step=16, n_layers_min=2,
                        n_layers_max=4, aspect_min=8.0, aspect_max=64.0, head_dims=(16,), kv_heads=(2,),
                        granularities=(4, 2, 1), shared=(1, 0), expansion_max=16.0, expert_multiple=16,
                        max_seq_len=128, rope_theta=10000.0)
"""The architectures of this project's CPU studies (byte vocabulary, d_model 32-128, 2-4 layers). Its
preferred layout (first entries, used when a law cannot see the knob, as in
:func:`~moe_scaling.design.search.search`) is MobileMoE-like: G = 4 with one shared expert."""

STUDY_MODEL: dict[str, Any] = {"router": "softmax", "norm_topk": False}
STUDY_TRAIN: dict[str, Any] = {"dispatch": "capacity", "capacity_factor": 1.25}
"""Settings shared by the study grids (``sweeps/ondevice_isoflop.yaml``'s ``model`` and ``train``
sections) and the validation runs, so that both train alike on any backend: the softmax router
(the space's builder defaults to MobileMoE's sigmoid router), top-k weights not renormalised (a renormalised top-1 weight is always 1 and the router would learn from the balance
loss alone), and the capacity dispatch (``auto`` picks the dropless ``ragged`` one on accelerators,
which drops no token and so trains a different model than the CPU's)."""


@dataclass(frozen=True)
class StudySettings:
    """How a study trained its runs, for closed-loop runs that must train alike (``--like GRID``):
    the grid's ``data`` (corpus made absolute) and ``train`` sections (without tokens and seed), its
    router settings, and its learning rate as a rule of size: ``lr_points`` are the distinct
    (N, lr) pairs of its dense runs, N the non-embedding active parameters; :meth:`lr` interpolates
    log(lr) linearly in log(N) between them and continues the end segment's power law beyond them
    (one pair: that lr)."""

    data: dict[str, Any]
    train: dict[str, Any]
    model: dict[str, Any]
    lr_points: tuple[tuple[float, float], ...]
    sizes: tuple[tuple[int, int], ...]         # (d_model, n_layers) of the study's runs
    heads: tuple[tuple[int, int], ...]         # (n_heads, n_kv_heads) of the study's runs
    granularities: tuple[int, ...]
    expansion_max: float

    def lr(self, cfg: ModelConfig) -> float:
        """The study's learning rate for a model of ``cfg``'s size (class docstring)."""
        from moe_scaling.costs import param_counts

        c = param_counts(cfg)
        n = float(c.active - c.embedding)
        xs = np.log([p[0] for p in self.lr_points])
        ys = np.log([p[1] for p in self.lr_points])
        x = math.log(n)
        if len(xs) < 2 or xs[0] <= x <= xs[-1]:
            return float(np.exp(np.interp(x, xs, ys)))
        i = (0, 1) if x < xs[0] else (-2, -1)            # beyond the ends: the end segment's power law
        slope = (ys[i[1]] - ys[i[0]]) / (xs[i[1]] - xs[i[0]])
        return float(np.exp(ys[i[0]] + slope * (x - xs[i[0]])))

    def space(self, vocab_size: int | None = None) -> ArchSpace:
        """:data:`STUDY_SPACE` widened around the study: d_model from half its smallest to twice its
        largest width, its granularities (and 1 and 2), experts up to twice its largest expansion; so
        that a closed loop's optimum is stopped by its budget, not by the space (``space_bounds``
        reports it if it still is). Depth follows the study's own (d_model, n_layers) pairs
        (``ArchSpace.depth_rule``) when each width had one depth: a law fitted on one depth per
        width cannot say how depth matters (a depth-blind law put every 2.7e13 optimum at one
        layer, the space's floor, where no study run was); else 1 to twice its deepest layer count.
        Heads: the study's head count and KV groups when all its runs had the same (head_dim =
        d_model / n_heads, as its runs had), else the study space's 16-wide heads."""
        widths, depths = [d for d, _ in self.sizes], [n for _, n in self.sizes]
        step = STUDY_SPACE.d_model_step
        grans = tuple(dict.fromkeys((*STUDY_SPACE.granularities[:1], *sorted({1, 2, *self.granularities}))))
        rule = tuple(sorted(set(self.sizes))) if len(set(widths)) == len(self.sizes) else ()
        return dataclasses.replace(
            STUDY_SPACE, vocab_size=vocab_size or STUDY_SPACE.vocab_size,
            d_model_min=max(step, step * (min(widths) // 2 // step)), d_model_max=2 * max(widths),
            n_layers_min=1, n_layers_max=2 * max(depths), aspect_min=2.0, aspect_max=128.0,
            granularities=grans, expansion_max=2.0 * self.expansion_max, depth_rule=rule,
            **({"n_heads": self.heads[0][0], "kv_heads": (self.heads[0][1],)} if len(self.heads) == 1 else {}))


def study_settings(grid: str | Path) -> StudySettings:
    """The :class:`StudySettings` of the study grid file ``grid`` (expanded as ``moe-sweep`` does)."""
    from moe_scaling.costs import param_counts
    from moe_scaling.sweep.grid import expand_grid, load_grid, resolve_corpus

    spec = load_grid(grid)
    runs = expand_grid(spec)
    data = {**runs[0].data.to_dict(), "corpus": resolve_corpus(runs[0].data.corpus, Path(grid).resolve().parent)}
    train = {k: v for k, v in runs[0].train.to_dict().items() if k not in ("tokens", "seed", "lr")}
    model = {k: getattr(runs[0].model, k) for k in STUDY_MODEL}
    points = {}
    for r in runs:
        c = param_counts(r.model)
        if not r.model.is_moe:
            points.setdefault(float(c.active - c.embedding), set()).add(float(r.train.lr))
    if not points:                                   # no dense run: the runs' own sizes
        for r in runs:
            c = param_counts(r.model)
            points.setdefault(float(c.active - c.embedding), set()).add(float(r.train.lr))
    lr_points = tuple((n, float(np.exp(np.mean(np.log(sorted(lrs)))))) for n, lrs in sorted(points.items()))
    return StudySettings(data=data, train=train, model=model, lr_points=lr_points,
                         sizes=tuple(sorted({(r.model.d_model, r.model.n_layers) for r in runs})),
                         heads=tuple(sorted({(r.model.n_heads, r.model.n_kv_heads) for r in runs})),
                         granularities=tuple(sorted({int(r.model.granularity) for r in runs})),
                         expansion_max=max(float(r.model.expansion) for r in runs))


@dataclass(frozen=True)
class Named:
    """A candidate to train: its name, its role (``optimum``, ``runner_up``, ``alternative``) and
    the law's description of it."""

    name: str
    role: str
    candidate: Candidate
    also: tuple[str, ...] = ()
    """The names of the alternatives that are this same model (listed once, under its first name)."""


def model_shape(m: Mapping[str, Any]) -> str:
    """A candidate's model (its ``model`` mapping) in a few words, as every table of candidates prints it:
    ``d32 x 2, 38 x 64 top-1 + 1 shared x 64 (G2, E19)`` (width x layers, experts x expert width, top-k,
    shared experts x their width, then the layout: granularity G = d_ff / d_expert and expansion
    E = n_experts / G, as :class:`~moe_scaling.config.ModelConfig` defines them) or ``d48 x 2, dense``.
    The layout is printed because a law is fitted over a range of G and E: a candidate outside it is
    an extrapolation in layout, whatever its compute."""
    head = f"d{m['d_model']} x {m['n_layers']}, "
    if m["n_experts"] <= 1:
        return head + "dense"
    shared = f" + {m['n_shared']} shared x {m['d_shared']}" if m.get("n_shared") else ""
    g = m["d_ff"] / m["d_expert"]
    return head + f"{m['n_experts']} x {m['d_expert']} top-{m['top_k']}{shared} (G{g:.3g}, E{m['n_experts'] / g:.3g})"


def _best_per_line(model: LossModel, budget: Budget,
                   space: ArchSpace) -> list[tuple[float, ModelConfig, tuple[int, int] | None]]:
    """The lowest-loss feasible point of every (trunk, layout) line with its layout, best first."""
    ev = _Evaluator(model, budget, space)
    out = []
    for t in trunks(space):
        for lay in [None] + layouts(space, t.d_model):
            line = expert_line(space, t, lay, budget, budget.memory)
            if line is None:
                continue
            s = ev.score(line)
            ok = np.logical_and.reduce(list(s["ok"].values()))
            loss = np.where(ok, s["loss"], np.inf)
            i = int(np.argmin(loss))
            if math.isfinite(loss[i]):
                out.append((float(loss[i]), line.config(space, i), lay))
    out.sort(key=lambda p: p[0])
    return out


def validation_candidates(model: LossModel, budget: Budget, space: ArchSpace = STUDY_SPACE, *,
                          level: float = 0.9) -> list[Named]:
    """The optimum, two runners-up and the named alternatives under ``budget`` (see the module
    docstring); raises :class:`NothingFits` when nothing fits."""
    every = _best_per_line(model, budget, space)
    reads = law_reads(model)
    grans = space.granularities if reads["granularity"] else space.granularities[:1]
    shared = space.shared if reads["n_shared"] else space.shared[:1]
    # the optimum and runners-up as the search sees them: knobs the law cannot read stay at the
    # space's preferred layout; the alternatives may use any layout
    lines = [(loss, cfg) for loss, cfg, lay in every if lay is None or (lay[0] in grans and lay[1] in shared)]
    if not lines:
        raise NothingFits(f"budget.memory = {budget.memory}: nothing in the study space fits; raise it")
    opt = lines[0][1]
    picks: list[tuple[str, str, ModelConfig]] = [("optimum", "optimum", opt)]
    picks += [(f"runner_up_{i + 1}", "runner_up", cfg) for i, (_, cfg) in enumerate(lines[1:3])]

    def first(pred):
        return next((cfg for _, cfg, _ in every if pred(cfg)), None)

    finest = max(space.granularities)
    alternatives = [
        ("best_dense", first(lambda c: not c.is_moe)),
        ("coarse_g1", first(lambda c: c.is_moe and c.granularity == 1)),
        ("g2", first(lambda c: c.is_moe and c.granularity == 2)),
        ("finest_g", first(lambda c: c.is_moe and c.granularity == finest)),
        ("with_shared", first(lambda c: c.is_moe and c.n_shared > 0)),
        ("no_shared", first(lambda c: c.is_moe and c.n_shared == 0)),
        ("over_sparse", first(lambda c: c.is_moe and c.expansion >= min(4 * opt.expansion, space.expansion_max)
                              and c.expansion > opt.expansion)),
    ]
    picks += [(name, "alternative", cfg) for name, cfg in alternatives if cfg is not None]
    out: list[Named] = []
    index: dict[ModelConfig, int] = {}
    for name, role, cfg in picks:
        if cfg in index:
            first_named = out[index[cfg]]
            out[index[cfg]] = dataclasses.replace(first_named, also=first_named.also + (name,))
            continue
        index[cfg] = len(out)
        out.append(Named(name, role, describe(model, cfg, budget, level=level)))
    return out


def _portable(data: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with a local corpus path written relative to ``folder`` (where the grid file goes; the
    sweep resolves it from there): a run id hashes the corpus as written, so an absolute path would
    tie the loop's runs to this machine's folders, and a fresh clone beside ``../shared`` could not
    resume them. ``stdlib`` and Hub datasets stay as they are."""
    from moe_scaling.sweep.grid import on_disk

    corpus = str(data["corpus"])
    if not on_disk(corpus) or not os.path.isabs(corpus):
        return dict(data)
    return {**data, "corpus": os.path.relpath(corpus, folder.resolve())}


def _grid_doc(named: list[Named], *, name: str, data: Mapping[str, Any], train: Mapping[str, Any],
              seeds: int, model: Mapping[str, Any] | None = None,
              like: StudySettings | None = None) -> dict[str, Any]:
    """The grid file: the :data:`STUDY_MODEL` settings (or ``model``'s) as its ``model`` section, one
    zip row per candidate with every other ModelConfig field explicit, tokens rounded to whole steps
    (at least one), and with ``like`` each candidate's learning rate from the study's rule."""
    model = dict(model or STUDY_MODEL)
    step = int(train["batch_size"]) * int(data["seq_len"])
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in model]
    zip_ = {f: [getattr(n.candidate.config, f) for n in named] for f in fields}
    zip_["tokens"] = [max(1, round(n.candidate.tokens / step)) * step for n in named]
    if like is not None:
        zip_["lr"] = [float(f"{like.lr(n.candidate.config):.3g}") for n in named]
    return {"name": name, "data": dict(data), "train": dict(train), "model": model, "zip": zip_,
            "seeds": list(range(seeds))}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if not np.isfinite(rho) else float(rho)


def concordance(pred: np.ndarray, meas: np.ndarray, floor: float | None) -> float | None:
    """The share of pairs ``(i, j)`` with ``|meas_i - meas_j| > 2 floor`` (told apart beyond the
    noise) on which ``sign(pred_i - pred_j) == sign(meas_i - meas_j)``; None when no pair qualifies
    or there is no noise floor. A pair the law predicts equal (a layout it cannot tell apart) counts
    as discordant: the measurement told them apart and the law did not."""
    if floor is None:
        return None
    agree = total = 0
    for i in range(len(meas)):
        for j in range(i + 1, len(meas)):
            if abs(meas[i] - meas[j]) > 2.0 * floor:
                total += 1
                agree += int(np.sign(pred[i] - pred[j]) == np.sign(meas[i] - meas[j]))
    return agree / total if total else None


def summarize(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The verdict numbers over candidate rows (``name``, ``predicted_loss``, ``measured``,
    ``in_interval``; rows without measurements are left out): ``noise_floor`` =
    ``sqrt(sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1))`` over the candidates' seed standard deviations
    ``s_i`` (ddof 1; each candidate weighted by its degrees of freedom; None with one seed), ``spearman`` (None below 3 candidates), ``predicted_best_is_measured_best``,
    ``within_interval`` (share of candidates whose measured mean lies in the law's interval; None
    without intervals), ``optimum_gap`` (the ``optimum`` row's measured mean minus the lowest; None
    without it) and :func:`concordance`."""
    done = [r for r in rows if r["measured"]]
    reps = [r["measured"] for r in done if len(r["measured"]) > 1]
    dof = sum(len(m) - 1 for m in reps)
    pred = np.array([r["predicted_loss"] for r in done])
    meas = np.array([np.mean(r["measured"]) for r in done])
    inside = [r["in_interval"] for r in done if r.get("in_interval") is not None]
    floor = float(math.sqrt(sum((len(m) - 1) * np.var(m, ddof=1) for m in reps) / dof)) if dof else None
    opt = [m for r, m in zip(done, meas) if r.get("name") == "optimum"]
    return {"noise_floor": floor,
            "spearman": _spearman(pred, meas),
            "predicted_best_is_measured_best": bool(np.argmin(pred) == np.argmin(meas)) if done else None,
            "within_interval": (sum(inside) / len(inside)) if inside else None,
            "optimum_gap": float(opt[0] - meas.min()) if opt else None,
            "concordance": concordance(pred, meas, floor)}


def verdict(result: Mapping[str, Any]) -> dict[str, Any]:
    """``{"passed": bool, "unmet": [reasons]}``: the targets of the module docstring that
    ``result`` (validation.json's keys) misses; a planned ``result`` is judged on where the budget
    binds alone. A target that cannot be judged (no noise floor, no intervals, no pair told apart)
    is unmet, with the reason."""
    unmet = []
    if not result.get("planned"):
        floor, gap = result.get("noise_floor"), result.get("optimum_gap")
        if floor is None or gap is None:
            unmet.append("optimum_gap: not judged (needs the optimum measured and 2 or more seeds)")
        elif gap > floor:
            unmet.append(f"optimum_gap {gap:.4f} = {gap / floor:.2f} noise floors (at most 1)")
        c = result.get("concordance")
        if c is None:
            unmet.append("concordance: not judged (no candidate pair differs by more than 2 noise floors)")
        elif c < 0.9:
            unmet.append(f"concordance {c:.2f} (at least 0.9)")
        w = result.get("within_interval")
        if w is None:
            unmet.append("within_interval: not judged (the law gives no intervals: fit it with a bootstrap)")
        elif w < 0.8:
            unmet.append(f"within_interval {w:.2f} (at least 0.8)")
    binding = list(result.get("binding") or [])
    if not {"memory", "latency_ms"} & set(binding):
        unmet.append(f"neither memory nor latency binds the optimum (binding: {', '.join(binding) or 'none'})")
    elif "latency_ms" not in binding and result.get("memory_use", 0.0) < 0.9:
        unmet.append(f"memory_use {result.get('memory_use', 0.0):.0%} (at least 90% where memory binds)")
    if result.get("space_bounds"):
        unmet.append(f"the optimum sits on search-space bounds: {', '.join(result['space_bounds'])}")
    return {"passed": not unmet, "unmet": unmet}


def _interval_of_mean(model: LossModel, cfg: ModelConfig, tokens: float, level: float,
                      seeds: int) -> tuple[float, float] | None:
    """The law's interval for the mean of ``seeds`` runs of ``cfg`` (None when it gives none)."""
    fn = getattr(model, "predict_interval", None)
    if fn is None or getattr(model, "has_samples", True) is False:
        return None
    lo, hi = fn(config_columns([cfg], [tokens]), level=level, seeds=seeds)
    return float(np.asarray(lo)[0]), float(np.asarray(hi)[0])


def _train_tokens(data: Mapping[str, Any]) -> int:
    """The training split's token count of the grid's ``data`` section (the tokenized corpus is cached)."""
    from moe_scaling.config import DataConfig
    from moe_scaling.train.data import load_tokens

    return len(load_tokens(DataConfig.from_dict(dict(data)))[0])


def _row(n: Named, tokens: int, settings: Mapping[str, Any], measured: list[float],
         iv: tuple[float, float] | None, train_tokens: int) -> dict[str, Any]:
    """One ``candidates`` entry of validation.json (module docstring)."""
    mean = float(np.mean(measured)) if measured else None
    return {"name": n.name, "role": n.role, "also": list(n.also),
            "model": {**n.candidate.config.to_dict(), **settings}, "predicted_loss": n.candidate.predicted_loss,
            "interval": list(iv) if iv else None, "tokens": tokens, "epochs": tokens / train_tokens, "measured": measured, "measured_mean": mean,
            "measured_std": float(np.std(measured, ddof=1)) if len(measured) > 1 else None,
            "in_interval": None if (iv is None or mean is None) else bool(iv[0] <= mean <= iv[1])}


def where_it_binds(model: LossModel, budget: Budget, space: ArchSpace, optimum: Candidate) -> dict[str, Any]:
    """``extrapolation``, ``binding``, ``memory_use``, ``space_bounds`` and ``depth_rule`` of the optimum (module
    docstring). ``binding`` comes from the search over the same space (a budget binds when relaxing it
    alone lowers the best predicted loss)."""
    fitted = ((getattr(model, "metrics", None) or {}).get("max_train_compute") or {}).get(budget.compute_rule)
    res = search(model, budget, space, method="exhaustive", frontier_points=2)
    optimum = res.sweet_spot or optimum          # one source: the search (the same optimum, ties aside)
    return {"extrapolation": (budget.train_compute / fitted) if fitted and budget.train_compute else None,
            "binding": res.binding, "memory_use": optimum.costs["total_bytes"] / budget.memory,
            "space_bounds": space_bounds(optimum.config, space),
            "depth_rule": [list(p) for p in space.depth_rule] or None}


def validate(model: LossModel, budget: Budget, out: str | Path, *, seeds: int = 3,
             space: ArchSpace = STUDY_SPACE, data: Mapping[str, Any] | None = None,
             train: Mapping[str, Any] | None = None, level: float = 0.9, name: str = "validation",
             workers: int = 1, like: StudySettings | None = None, plan: bool = False) -> dict[str, Any]:
    """Train :func:`validation_candidates` (``seeds`` seeds each) under ``out`` and write
    ``out/validation.json`` (see the module docstring). ``budget`` needs ``train_compute`` (the
    study's compute; tokens follow per architecture). ``data`` and ``train`` are the grid's base
    sections (defaults: the Gutenberg corpus beside the repository at seq_len 128, batch 16, lr 3e-3);
    ``like``: train as that study did (its data, train and router settings, its lr rule of size;
    :func:`study_settings`), overriding those defaults.

    ``plan``: write ``out/grid.yaml`` and return what would be trained, with ``planned`` true,
    each candidate's ``steps`` and the total ``steps`` over its seeds, and where the budget binds,
    before any compute is spent (no training, no ``validation.json``): the way to choose budgets
    under which memory binds the optimum (``memory_use`` near 1, ``space_bounds`` empty)."""
    import yaml

    from moe_scaling.sweep.runner import run_sweep
    from moe_scaling.sweep.layout import SweepDir
    import pandas as pd

    if budget.train_compute is None:
        raise ConfigError("--validate: needs --train-compute C (the study's training compute), so that "
                          "tokens follow each architecture")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: must be a whole number >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(data or {"corpus": str(Path(__file__).resolve().parents[3] / "shared" / "data" / "text" / "gutenberg"),
                         "seq_len": 128})
    train = {"batch_size": 16, "lr": 0.003, "eval_every": 200, "eval_batches": 8, "ckpt_every": 200,
             "log_every": 20, **STUDY_TRAIN, **(train or {})}
    settings = dict(STUDY_MODEL)
    if like is not None:
        data, train, settings = dict(like.data), {**like.train, "lr": 0.003}, dict(like.model)
    named = validation_candidates(model, budget, space, level=level)
    doc = _grid_doc(named, name=name, data=_portable(data, out), train=train, seeds=seeds, model=settings,
                    like=like)
    grid = out / "grid.yaml"
    atomic_write_text(grid, yaml.safe_dump(doc, sort_keys=False))
    binds = where_it_binds(model, budget, space, named[0].candidate)
    train_tokens = _train_tokens(data)
    if plan:
        step = int(train["batch_size"]) * int(data["seq_len"])
        rows = [_row(n, tokens, settings, [], None, train_tokens) | {"steps": tokens // step}
                for n, tokens in zip(named, doc["zip"]["tokens"])]
        planned = {"budget": budget.to_dict(), "planned": True, "candidates": rows, "seeds": seeds,
                   "steps": seeds * sum(r["steps"] for r in rows), **binds, "grid": str(grid)}
        return planned | {"verdict": verdict(planned)}
    sweep_dir = out / "sweep"
    run_sweep(grid, sweep_dir, workers=workers)
    runs = pd.read_parquet(SweepDir(sweep_dir).runs_table)
    runs = runs[runs["status"] == "completed"]
    rows = []
    for n, tokens in zip(named, doc["zip"]["tokens"]):
        c = n.candidate.config
        m = runs[(runs["d_model"] == c.d_model) & (runs["n_layers"] == c.n_layers)
                 & (runs["n_experts"] == c.n_experts) & (runs["top_k"] == c.top_k)
                 & (runs["n_shared"] == c.n_shared) & (runs["tokens"] == tokens)]
        if c.is_moe:
            m = m[m["d_expert"] == c.d_expert]
        measured = sorted(float(v) for v in m["eval_loss"])
        iv = _interval_of_mean(model, c, n.candidate.tokens, level, len(measured)) if measured else None
        rows.append(_row(n, tokens, settings, measured, iv, train_tokens))
    result = {"budget": budget.to_dict(), "candidates": rows, **summarize(rows), **binds, "grid": str(grid),
              "sweep": str(sweep_dir)}
    result["verdict"] = verdict(result)
    atomic_write_text(out / "validation.json", json.dumps(result, indent=1, default=json_default) + "\n")
    return result
