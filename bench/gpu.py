"""The accelerator path, checked in one prepared GPU session (issue 24, item 5).

    python bench/gpu.py --out bench/gpu.json               # on one H100 / H200: at most ~8 minutes
    python bench/gpu.py --tiny --out /tmp/gpu.json          # tiny sizes, any machine (tests/test_gpu_bench.py)
    python bench/gpu.py --parts b --peak-tflops 989         # one part; the card's bf16 dense peak given

Three parts, each in its own Python process (``python bench/gpu.py --part a ...``): JAX takes 75% of
a GPU's memory per process, part (c) starts sweeps that are processes of their own, and a part that
crashes, runs out of memory or out of time is recorded without losing the others. The JSON is
rewritten after every part, so a session cut short keeps what was measured.

(a) ``ragged_vs_capacity``: the ``ragged`` dispatch (``jax.lax.ragged_dot``, what ``dispatch: auto``
    picks on a GPU) in bfloat16 against the ``capacity`` dispatch in bfloat16 with capacity factor
    ``n_experts / top_k``, at which the capacity is every token (nothing drops; the recorded
    ``dropped_fraction`` says so): the train losses of 5 steps of the trainer's own jitted step
    (:func:`moe_scaling.train.step.make_train_step`) from the same initialisation
    (:func:`~moe_scaling.train.step.init_state`, seed 0) on the same batches (the embedded ``stdlib``
    corpus, byte tokens). Both compute the same function; they may round differently. Tolerance per
    step: ``|loss_ragged - loss_capacity| <= loss_capacity * 2^-9 * 2 * 2 * n_moe_layers``. Source:
    bfloat16 keeps 8 significand bits, so one rounding moves a value by at most 2^-9 of itself; the
    two dispatches differ only inside the routed experts, whose two matmuls per MoE layer (gate/up
    and down) each round once in each dispatch (their kernels accumulate in different orders), so
    each MoE layer can move its output by 2 x 2 x 2^-9 relative between the two, and the depth adds
    this once per MoE layer to the residual stream and so, to first order, to the loss. It is a
    first-order bound, not a statistical estimate (the rounding errors of thousands of tokens mostly
    cancel in the mean loss); ``capacity_f32`` (the same run in float32) shows how far bf16 itself
    moves the losses. On CPU ``ragged_dot`` runs too (a masked product over every expert).
(b) ``mfu``: train-step MFU of a d1024 fine-grained MoE (``MFU_MODEL``: 8 layers, 64 experts of width
    512, top-8, plus one shared expert of 512, GQA 16/4 heads, vocabulary 32,768, seq 2048) in
    bfloat16 (mixed precision: float32 master weights and AdamW moments), random tokens, for the
    ``ragged`` and the ``capacity`` (factor 1.25, the trainer's default) dispatch: FLOPs per step
    ``moe_scaling.costs.flops_per_token(cfg, seq, training=True)`` x tokens per step, over the
    median steady-state step time (after a compile and warm-up steps), over the card's bf16 dense
    peak: ``--peak-tflops``, else :data:`PEAK_TFLOPS` by ``device_kind`` (NVIDIA's datasheets give
    bf16 Tensor Core figures "with sparsity"; the dense peak is half: H100 SXM and H200 SXM 1,979 ->
    989 TFLOP/s, H100 NVL and H200 NVL 1,671 -> 835, H100 PCIe 1,513 -> 756). Target >= 35%. A batch
    that does not fit is retried at half the rows (``batch_tried``).
(c) ``seed_batching``: the smallest budget of ``sweeps/ondevice_isoflop.yaml`` (its runs of 2,668,544,
    1,605,632 and 524,288 tokens: 3 sizes x 6 layouts x 3 seeds = 54 runs) trained by ``moe-sweep run``
    (one worker, a fresh process, a fresh temporary folder each) with seed batching (the default) and
    with ``--no-batch``: wall time ratio no-batch / batched (target 1.8x). One grid file per size
    (the study's configs unchanged, its corpus made absolute), shortest first, each size batched then
    no-batch, so that a budget spent part-way still leaves whole sizes; ``ratio`` is over the sizes
    that finished both (``complete`` says whether all did). The study's corpus
    (``../shared/data/text/gutenberg``) does not travel to a device machine with the repository:
    when it is missing the runs read ``stdlib`` instead (``corpus`` records which; the steps of these
    models do not depend on the text), or give ``--corpus``.

``--tiny``: each part at toy size on whatever JAX finds (a 2-layer d64 MoE for (a), a d64 MoE for (b),
a 2-run grid written to a temporary folder for (c)), about a minute on 2 CPU cores (70 s under load).
The JSON records the device (``jax.devices()[0].device_kind``), ``gpu_figures`` (false on any non-GPU
backend: then the figures are not GPU figures), :func:`moe_scaling.runtime.machine_info`, what ran and
each part's time.

Results: bench/gpu.json (not run yet: no GPU was available) and bench/README.md, section "gpu".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("gpu.json")
ISOFLOP_GRID = REPO / "sweeps" / "ondevice_isoflop.yaml"
SMALLEST_BUDGET_TOKENS = (2668544, 1605632, 524288)   # the 1.5e12-FLOP budget's runs (d48, d64, d96)

BF16_UNIT = 2.0 ** -9   # bfloat16: 8 significand bits, so one rounding is within 2^-9 relative
STEPS_A = 5

# bf16 dense Tensor Core peak, TFLOP/s, by device_kind substring, first match wins: half of NVIDIA's
# datasheet "with sparsity" figure (H100: H100 SXM 1,979, H100 NVL 1,671, H100 PCIe 1,513; H200:
# H200 SXM 1,979, H200 NVL 1,671).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
               ("H200", 989.0))
PEAK_SOURCE = "NVIDIA H100 / H200 datasheets: bf16 Tensor Core 'with sparsity' figure / 2 (dense)"

# Time limits per part (seconds), within the whole --budget-s; (c) gets whatever is left.
PART_LIMIT_S = {"a": 120, "b": 210, "c": 600}
PART_KEYS = {"a": "ragged_vs_capacity", "b": "mfu", "c": "seed_batching"}


def _model(**kw):
    from moe_scaling.config import ModelConfig

    return ModelConfig(**kw)


def _sizes(tiny: bool) -> dict:
    """The models and batch shapes of every part (plain dicts, recorded in the JSON)."""
    if tiny:
        return {
            "a": dict(model=dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                 n_experts=8, top_k=2, d_expert=64, n_shared=1, max_seq_len=64),
                      seq_len=64, batch_size=4),
            "b": dict(model=dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                                 n_experts=8, top_k=2, d_expert=64, n_shared=1, max_seq_len=64),
                      seq_len=64, batch_sizes=[4, 2], warmup_steps=1, timed_steps=3),
        }
    return {
        # (a): the same fine-grained layout as (b) at a size that compiles in seconds
        "a": dict(model=dict(vocab_size=256, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=2048,
                             n_experts=64, top_k=8, d_expert=256, n_shared=1, max_seq_len=512),
                  seq_len=512, batch_size=8),
        # (b) MFU_MODEL: d1024, 64 experts of d_ff / 8 = 512, top-8 (active routed width 4096 = d_ff),
        # one shared expert of 512; ~0.87B parameters, ~0.14B active
        "b": dict(model=dict(vocab_size=32768, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=4,
                             d_ff=4096, n_experts=64, top_k=8, d_expert=512, n_shared=1, max_seq_len=2048),
                  seq_len=2048, batch_sizes=[8, 4], warmup_steps=3, timed_steps=10),
    }


MFU_MODEL = _sizes(False)["b"]["model"]


# --------------------------------------------------------------------------------------
# (a) ragged against capacity, bf16, no drops
# --------------------------------------------------------------------------------------


def part_a(tiny: bool, deadline: float) -> dict:
    import jax
    import numpy as np

    from moe_scaling.config import DataConfig, TrainConfig
    from moe_scaling.train.data import load_tokens, train_batch
    from moe_scaling.train.step import init_state, make_train_step

    size = _sizes(tiny)["a"]
    model = _model(**size["model"])
    seq, batch = size["seq_len"], size["batch_size"]
    tokens, _, _ = load_tokens(DataConfig(corpus="stdlib", seq_len=seq))
    batches = [train_batch(tokens, batch, seq, 0, s) for s in range(STEPS_A)]
    no_drop = model.n_experts / model.top_k        # capacity(T, k, E, E / k) = T: every token fits

    def run(dispatch: str, dtype: str) -> dict:
        cfg = TrainConfig(tokens=STEPS_A * batch * seq, batch_size=batch, dispatch=dispatch, dtype=dtype,
                          capacity_factor=no_drop, seed=0)
        graphdef, state = init_state(model, cfg, STEPS_A)
        step = make_train_step(graphdef, cfg, dispatch)
        losses, dropped = [], []
        for x, y in batches:
            state, m = step(state, x, y)
            losses.append(float(m["loss"]))
            dropped.append(float(m["dropped_fraction"]))
        return {"losses": losses, "dropped_fraction": dropped}

    runs = {"ragged_bf16": run("ragged", "bfloat16"), "capacity_bf16": run("capacity", "bfloat16"),
            "capacity_f32": run("capacity", "float32")}
    ragged = np.array(runs["ragged_bf16"]["losses"])
    cap = np.array(runs["capacity_bf16"]["losses"])
    rel = BF16_UNIT * 2 * 2 * model.n_moe_layers
    tol = np.abs(cap) * rel
    diff = np.abs(ragged - cap)
    return {
        "model": size["model"], "seq_len": seq, "batch_size": batch, "steps": STEPS_A,
        "capacity_factor": no_drop, "corpus": "stdlib", "train": "moe_scaling.train.step.make_train_step, "
        "TrainConfig defaults (lr 3e-3, AdamW, clip 1.0), seed 0",
        "device_kind": jax.devices()[0].device_kind,
        "runs": runs,
        "abs_diff": [float(v) for v in diff], "max_abs_diff": float(diff.max()),
        "tolerance": [float(v) for v in tol], "relative_tolerance": rel,
        "tolerance_source": ("bf16 keeps 8 significand bits: 2^-9 relative per rounding; 2 expert matmuls per "
                             "MoE layer x 2 dispatches each rounding once x n_moe_layers "
                             f"({model.n_moe_layers}) = {rel:.4g} of the loss (first-order bound)"),
        "max_diff_over_tolerance": float((diff / tol).max()),
        "within_tolerance": bool(np.all(diff <= tol)),
        "bf16_vs_f32_max_abs_diff": float(np.abs(cap - np.array(runs["capacity_f32"]["losses"])).max()),
        "nothing_dropped": max(runs["capacity_bf16"]["dropped_fraction"]) == 0.0,
    }


# --------------------------------------------------------------------------------------
# (b) MFU of the train step
# --------------------------------------------------------------------------------------


def peak_for(device_kind: str) -> float | None:
    """The bf16 dense peak (TFLOP/s) of a known card, else None."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def _time_steps(model, dispatch: str, seq: int, batch: int, warmup: int, timed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_scaling.config import TrainConfig
    from moe_scaling.train.step import init_state, make_train_step

    steps = warmup + timed
    cfg = TrainConfig(tokens=steps * batch * seq, batch_size=batch, dispatch=dispatch, dtype="bfloat16", seed=0)
    graphdef, state = init_state(model, cfg, steps)
    rng = np.random.default_rng(0)
    data = [tuple(jnp.asarray(rng.integers(0, model.vocab_size, (batch, seq)), jnp.int32) for _ in range(2))
            for _ in range(steps)]
    t0 = time.perf_counter()
    step = make_train_step(graphdef, cfg, dispatch).lower(state, *data[0]).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i, (x, y) in enumerate(data):
        t0 = time.perf_counter()
        state, m = step(state, x, y)
        jax.block_until_ready(state)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"compile_s": round(compile_s, 2), "step_s": statistics.median(times), "step_s_all": times,
            "loss_last": float(m["loss"]), "dropped_fraction_last": float(m["dropped_fraction"])}


def _out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def part_b(tiny: bool, deadline: float, peak_tflops: float | None) -> dict:
    import jax

    from moe_scaling.costs import flops_per_token, param_counts

    size = _sizes(tiny)["b"]
    model = _model(**size["model"])
    seq = size["seq_len"]
    kind = jax.devices()[0].device_kind
    peak = peak_tflops if peak_tflops is not None else peak_for(kind)
    source = ("--peak-tflops" if peak_tflops is not None else PEAK_SOURCE if peak is not None
              else f"unknown for device_kind {kind!r}: no MFU (give --peak-tflops)")
    flops_tok = flops_per_token(model, seq, training=True)
    counts = param_counts(model)
    rows = []
    for dispatch in ("ragged", "capacity"):
        if time.time() > deadline - 5:
            rows.append({"dispatch": dispatch, "error": "skipped: the time budget was spent"})
            continue
        tried = []
        for batch in size["batch_sizes"]:      # a batch that does not fit: half the rows
            tried.append(batch)
            try:
                r = _time_steps(model, dispatch, seq, batch, size["warmup_steps"], size["timed_steps"])
            except Exception as err:  # noqa: BLE001 - recorded, the next batch or dispatch goes on
                if _out_of_memory(err) and batch != size["batch_sizes"][-1]:
                    gc.collect()                     # the failed attempt's buffers, before the next
                    continue
                rows.append({"dispatch": dispatch, "batch_tried": tried,
                             "error": f"{type(err).__name__}: {str(err)[:1500]}"})
                break
            flops_step = flops_tok * batch * seq
            achieved = flops_step / r["step_s"] / 1e12
            rows.append({"dispatch": dispatch, "batch_size": batch, "batch_tried": tried,
                         "tokens_per_step": batch * seq, "flops_per_step": flops_step,
                         "tokens_per_s": round(batch * seq / r["step_s"], 1), "tflops": round(achieved, 2),
                         "mfu": None if peak is None else round(achieved / peak, 4), **r})
            break
    return {"model": size["model"], "seq_len": seq, "dtype": "bfloat16",
            "params_total": counts.total, "params_active": counts.active,
            "flops_per_token_training": flops_tok,
            "flops_source": "moe_scaling.costs.flops_per_token(cfg, seq_len, training=True) x tokens per step",
            "warmup_steps": size["warmup_steps"], "timed_steps": size["timed_steps"],
            "step_time": "median of the timed steps, each blocked on the new state",
            "device_kind": kind, "peak_tflops": peak, "peak_source": source, "target_mfu": 0.35,
            "capacity_factor_capacity_row": 1.25, "rows": rows}


# --------------------------------------------------------------------------------------
# (c) seed batching against --no-batch through moe-sweep run
# --------------------------------------------------------------------------------------


def _isoflop_grids(corpus: str | None) -> tuple[list[tuple[str, dict]], str]:
    """One grid per size of the smallest budget (shortest runs first) and the corpus they read."""
    import yaml

    from moe_scaling.sweep.grid import resolve_corpus

    spec = yaml.safe_load(ISOFLOP_GRID.read_text())
    if corpus is None:
        corpus = resolve_corpus(spec["data"]["corpus"], ISOFLOP_GRID.parent)
        if not Path(corpus).exists():
            corpus = "stdlib"
    zipped = spec["zip"]
    rows = [i for i, t in enumerate(zipped["tokens"]) if t in SMALLEST_BUDGET_TOKENS]
    rows.sort(key=lambda i: zipped["tokens"][i])
    grids = []
    for i in rows:
        g = dict(spec, name=f"{spec['name']}_d{zipped['d_model'][i]}", data=dict(spec["data"], corpus=corpus),
                 zip={axis: [values[i]] for axis, values in zipped.items()})
        grids.append((f"d{zipped['d_model'][i]}", g))
    return grids, corpus


def _tiny_grid() -> list[tuple[str, dict]]:
    """2 runs (seeds 0 and 1 of one tiny MoE), which seed batching trains as one group."""
    return [("tiny", {"name": "gpu_tiny", "data": {"corpus": "stdlib", "seq_len": 32},
                      "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                                "n_experts": 4, "top_k": 1},
                      "train": {"tokens": 6 * 4 * 32, "batch_size": 4, "eval_every": 6, "eval_batches": 1,
                                "ckpt_every": 6, "log_every": 3, "dispatch": "capacity"},
                      "seeds": [0, 1]})]


def _sweep(grid: Path, out: Path, batch: bool, timeout: float) -> dict:
    import pandas as pd

    cmd = [sys.executable, "-m", "moe_scaling.cli.sweep", "run", str(grid), "--out", str(out), "--quiet"]
    cmd += [] if batch else ["--no-batch"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    row = {"command": " ".join(["moe-sweep", *cmd[3:]]), "returncode": proc.returncode, "wall_s": round(wall, 2)}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip()[-1500:]
    if (out / "runs.parquet").exists():
        runs = pd.read_parquet(out / "runs.parquet")
        row.update(runs=len(runs), statuses=runs["status"].value_counts().to_dict(),
                   step_time_s=round(float(runs["step_time_s"].sum()), 2),
                   group_sizes=sorted({int(v) for v in runs.get("group_size", pd.Series([1] * len(runs)))}))
    return row


def part_c(tiny: bool, deadline: float, corpus: str | None) -> dict:
    import yaml

    from moe_scaling.config import DataConfig
    from moe_scaling.train.data import load_tokens

    if tiny:
        grids, corpus = _tiny_grid(), "stdlib"
    else:
        grids, corpus = _isoflop_grids(corpus)
    load_tokens(DataConfig(corpus=corpus))        # tokenized and cached once, before either side is timed
    sizes = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-sweeps-") as tmp:
        for name, grid in grids:
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(grid, sort_keys=False))
            row = {"size": name, "zip": grid.get("zip")}
            for side, batch in (("batched", True), ("no_batch", False)):
                left = deadline - time.time()
                if left < 5:
                    row[side] = {"error": "skipped: the time budget was spent"}
                    continue
                try:
                    row[side] = _sweep(path, Path(tmp) / f"{name}_{side}", batch, left)
                except subprocess.TimeoutExpired:
                    row[side] = {"error": f"timed out after {left:.0f} s (the time budget)"}
            done = all(row.get(s, {}).get("returncode") == 0 for s in ("batched", "no_batch"))
            if done:
                row["ratio"] = round(row["no_batch"]["wall_s"] / row["batched"]["wall_s"], 3)
            sizes.append(row)
    finished = [r for r in sizes if "ratio" in r]
    total = {s: round(sum(r[s]["wall_s"] for r in finished), 2) for s in ("batched", "no_batch")}
    return {"grid": "tiny 2-run grid" if tiny else str(ISOFLOP_GRID.relative_to(REPO)),
            "tokens": None if tiny else list(SMALLEST_BUDGET_TOKENS), "corpus": corpus, "workers": 1,
            "sizes": sizes, "wall_s": total,
            "ratio": round(total["no_batch"] / total["batched"], 3) if finished else None,
            "ratio_is": "wall time of moe-sweep run --no-batch / moe-sweep run (seed batching), fresh folders",
            "complete": len(finished) == len(sizes), "target": 1.8}


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def _run_part(part: str, args, deadline: float, env: dict) -> dict:
    """Run one part in a child process (this script with --part) and return its record."""
    limit = min(PART_LIMIT_S[part], deadline - time.time())
    if limit < 5:
        return {"ok": False, "error": "skipped: the time budget was spent"}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-part-") as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", part, "--part-out", str(out), "--deadline",
               str(time.time() + limit)]
        cmd += ["--tiny"] if args.tiny else []
        cmd += [] if args.peak_tflops is None else ["--peak-tflops", str(args.peak_tflops)]
        cmd += [] if args.corpus is None else ["--corpus", args.corpus]
        t0 = time.perf_counter()
        try:
            # (a) and (b) have the GPU to themselves (this process holds no buffers): 90% of its memory,
            # not JAX's default 75%, lets (b)'s batch of 8 x 2048 fit an H100 (analytic plan 50.5 GB,
            # XLA's plans measured 1.05-1.26x of it); (c)'s sweeps keep their own default
            if part in ("a", "b"):
                env = env | {"XLA_PYTHON_CLIENT_MEM_FRACTION": env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit + 30)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {limit + 30:.0f} s",
                    "wall_s": round(time.perf_counter() - t0, 1)}
        wall = round(time.perf_counter() - t0, 1)
        if out.exists():
            return json.loads(out.read_text()) | {"wall_s": wall}
        return {"ok": False, "returncode": proc.returncode, "error": proc.stderr.strip()[-3000:], "wall_s": wall}


def _child(args) -> None:
    import moe_scaling  # noqa: F401 - the allocator setting, before JAX starts

    try:
        if args.part == "a":
            rec = part_a(args.tiny, args.deadline)
        elif args.part == "b":
            rec = part_b(args.tiny, args.deadline, args.peak_tflops)
        else:
            rec = part_c(args.tiny, args.deadline, args.corpus)
        rec = {"ok": True, **rec}
    except Exception as err:  # noqa: BLE001 - the record says what went wrong
        rec = {"ok": False, "error": f"{type(err).__name__}: {err}"[:3000], "traceback": traceback.format_exc()[-3000:]}
    Path(args.part_out).write_text(json.dumps(rec, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS), help="JSON file to write (default bench/gpu.json)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the whole script in about a minute on CPU")
    p.add_argument("--parts", default="a,b,c", help="which parts, comma-separated (default a,b,c)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's bf16 dense peak for MFU (default: by device kind, H100 SXM / H200 989)")
    p.add_argument("--corpus", default=None, help="corpus of (c)'s runs (default: the grid's, else stdlib)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget of the whole script (default 450 s, inside an 8-minute session)")
    p.add_argument("--part", choices=tuple(PART_KEYS), help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        _child(args)
        return 0

    t_start = time.time()
    deadline = t_start + args.budget_s
    env = dict(os.environ)                                  # the parts take the GPU memory they want
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"   # this process only reads the device's name
    import jax

    import moe_scaling  # noqa: F401
    from moe_scaling.runtime import machine_info
    from moe_scaling.sweep.results import code_version

    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    doc = {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
           "gpu_figures": gpu,
           "note": None if gpu else f"run on {device.platform}, not a GPU: these are not GPU figures",
           "tiny": args.tiny, "command": " ".join(["python bench/gpu.py", *(argv or sys.argv[1:])]),
           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS"),
           "machine": machine_info() | {"code_version": code_version()},
           "budget_s": args.budget_s, "parts": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    for part in parts:
        if part not in PART_KEYS:
            p.error(f"--parts: {part!r} is not one of a, b, c")
    for part in parts:
        print(f"gpu bench: part {part} ({PART_KEYS[part]})...", file=sys.stderr, flush=True)
        doc["parts"][PART_KEYS[part]] = _run_part(part, args, deadline, env)
        doc["wall_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        rec = doc["parts"][PART_KEYS[part]]
        print(f"gpu bench: part {part}: {'ok' if rec.get('ok') else 'FAILED: ' + str(rec.get('error'))[:300]} "
              f"({rec.get('wall_s')} s)", file=sys.stderr, flush=True)
    return 0 if all(r.get("ok") for r in doc["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
