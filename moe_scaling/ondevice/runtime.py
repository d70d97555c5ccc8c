"""Export a model to ONNX Runtime (INT4 weights) and run it: prefill, decode, logits, loss.

:func:`export_onnx` writes a folder a phone app (or this CPU) runs with ONNX Runtime alone::

    model.onnx       the decoder of moe_scaling.ondevice.onnx_graph (INT4 MatMulNBits / QMoE)
    runtime.json     the model config, the activation scheme, the maximum context, the I/O names
    tokenizer.json   for bpe runs (the byte tokenizer needs none: token id = byte value)

:class:`OnnxLM` loads such a folder into an ``onnxruntime.InferenceSession`` with a given number
of threads and runs it with a float32 KV cache: :meth:`OnnxLM.prefill` a prompt, then
:meth:`OnnxLM.decode` one token at a time (:meth:`OnnxLM.prefill_ms` and :meth:`OnnxLM.decode_ms` time
them, as the benchmarks under bench/ measure them).

Why ONNX Runtime and not ExecuTorch (the MobileMoE team's runtime), decided by trying both
(docs/design.md, section 9): ExecuTorch 1.5.1's XNNPACK delegate needs static shapes, so a top-k
dispatch (how many tokens each expert gets is data-dependent) stays outside the delegate and
``to_executorch`` failed on it; the only MoE that exported computed every expert for every token,
which cannot show the decode speedup the paper measures. ONNX Runtime's CPU kernels run the same
int4-weight / int8-activation scheme (``MatMulNBits``, ``accuracy_level=4``) with dynamic shapes
and a fused MoE kernel (``QMoE``) that runs only the routed experts; its wheel is 28 MB against
ExecuTorch's 2.6 GB install. onnxruntime-genai is a generation loop over the same runtime for
models in its own builder's layout; we drive the session directly (the loop is ten lines).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_scaling.config import ModelConfig
from moe_scaling.costs import stored_bytes
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_path, atomic_write_text

__all__ = ["export_onnx", "export_onnx_checkpoint", "OnnxLM", "RUNTIME_FORMAT"]

RUNTIME_FORMAT = "moe_scaling-onnx-1"


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("the ONNX runtime export needs the ondevice extra: pip install -e '.[ondevice]'") from None


def export_onnx(cfg: ModelConfig, params: Any, out_dir: str | os.PathLike, *, activations: str = "int8",
                max_positions: int | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` and ``runtime.json`` for a model in memory (``params``: a
    :class:`~moe_scaling.model.transformer.Transformer`, its ``nnx.State`` or pure dict). Returns a
    summary: files, bytes, ``int4_weight_bytes`` (the MatMulNBits/QMoE operands), activations."""
    _require_onnx()
    from moe_scaling.hf.export import _pure_params
    from moe_scaling.ondevice.onnx_graph import build_onnx

    pure = _pure_params(cfg, params)
    max_positions = cfg.max_seq_len if max_positions is None else max_positions
    model = build_onnx(cfg, pure, activations=activations, max_positions=max_positions)
    int4 = sum(len(t.raw_data) for t in model.graph.initializer
               if t.name.endswith((".q4", ".scales")))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    with atomic_path(out / "model.onnx") as tmp:
        tmp.write_bytes(data)
    meta = {"format": RUNTIME_FORMAT, "model": cfg.to_dict(), "activations": activations,
            "max_positions": max_positions, "weights": "int4 (group 32, fp16 scales)",
            "kv_cache": "float32 [1, n_kv_heads, positions, head_dim] per layer (BNSH)",
            "inputs": ["input_ids"] + [f"past_{k}_{i}" for i in range(cfg.n_layers) for k in ("key", "value")],
            "outputs": ["logits"] + [f"present_{k}_{i}" for i in range(cfg.n_layers) for k in ("key", "value")]}
    atomic_write_text(out / "runtime.json", json.dumps(meta, indent=1) + "\n")
    return {"out": str(out), "files": ["model.onnx", "runtime.json"], "bytes": len(data),
            "int4_weight_bytes": int4, "cost_model_bytes": int(stored_bytes(cfg, "onnxruntime", max_positions=max_positions)),
            "activations": activations, "max_positions": max_positions}


def export_onnx_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, activations: str = "int8",
                           step: int | None = None) -> dict[str, Any]:
    """:func:`export_onnx` of a training run's checkpoint (latest, or ``step``), plus the run's
    tokenizer files for bpe runs."""
    _require_onnx()
    from moe_scaling.hf.export import load_run, write_tokenizer_files
    from moe_scaling.model.quant import check_quantizable
    from moe_scaling.ondevice.onnx_graph import ACCURACY_LEVELS

    if activations not in ACCURACY_LEVELS:
        raise ConfigError(f"activations = {activations!r}: use one of {', '.join(ACCURACY_LEVELS)}")
    model_cfg, data_cfg, model, step, record = load_run(run_dir, step=step, check=check_quantizable)
    summary = export_onnx(model_cfg, model, out_dir, activations=activations)
    if data_cfg.tokenizer != "byte":
        summary["files"] += write_tokenizer_files(model_cfg, data_cfg, Path(out_dir))
    summary.update(run=str(run_dir), step=step, status=record.get("status"))
    return summary


class OnnxLM:
    """An exported folder (or ``model.onnx`` path) in an ONNX Runtime CPU session.

    ``threads`` is the session's intra-op thread count (inter-op 1, sequential execution); the
    cache is a dict of the ``present_*`` outputs fed back as ``past_*``."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1):
        _require_onnx()
        import onnxruntime as ort

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        model_path = folder / "model.onnx" if path.is_dir() else path
        meta_path = folder / "runtime.json"
        if not model_path.is_file() or not meta_path.is_file():
            raise ConfigError(f"path = {str(path)!r}: no model.onnx and runtime.json; write them with "
                              "moe-export RUN --out DIR --runtime onnx")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != RUNTIME_FORMAT:
            raise ConfigError(f"{meta_path}: format {self.meta.get('format')!r}, expected {RUNTIME_FORMAT!r}; "
                              "export it again with this version")
        self.cfg = ModelConfig.from_dict(self.meta["model"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = threads
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self.session.get_outputs()]

    def empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        return {f"past_{k}_{i}": np.zeros(shape, np.float32)
                for i in range(self.cfg.n_layers) for k in ("key", "value")}

    def forward(self, tokens, cache: Mapping[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(logits [S, vocab], new cache)`` of ``tokens`` (``S`` ids) after ``cache``."""
        ids = np.asarray(tokens, np.int64).reshape(1, -1)
        cache = self.empty_cache() if cache is None else cache
        past = next(iter(cache.values())).shape[2]
        if past + ids.shape[1] > self.meta["max_positions"]:
            raise ConfigError(f"context = {past + ids.shape[1]}: longer than the exported "
                              f"max_positions {self.meta['max_positions']}; export with a longer max_seq_len")
        outs = dict(zip(self._outputs, self.session.run(None, {"input_ids": ids, **cache})))
        new = {name.replace("present_", "past_"): v for name, v in outs.items() if name.startswith("present_")}
        return outs["logits"], new

    def prefill(self, tokens) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The prompt's logits and its cache."""
        return self.forward(tokens)

    def decode(self, token: int, cache: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The next position's logits ``[vocab]`` and the cache one token longer."""
        logits, cache = self.forward([token], cache)
        return logits[0], cache

    def prefill_ms(self, tokens, reps: int = 3) -> float:
        """Milliseconds to prefill ``tokens``: the best of ``reps`` after one warm-up."""
        self.prefill(tokens)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            self.prefill(tokens)
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)

    def decode_ms(self, tokens, after: int) -> float:
        """Milliseconds per decoded token: ``tokens[:after]`` prefilled, then each of
        ``tokens[after:]`` decoded in turn; the median over those steps."""
        _, cache = self.prefill(tokens[:after])
        steps = []
        for t in tokens[after:]:
            t0 = time.perf_counter()
            _, cache = self.decode(int(t), cache)
            steps.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(steps))

    def generate(self, prompt, n: int) -> list[int]:
        """``n`` greedily decoded token ids after ``prompt``."""
        logits, cache = self.prefill(prompt)
        out = [int(np.argmax(logits[-1]))]
        for _ in range(n - 1):
            row, cache = self.decode(out[-1], cache)
            out.append(int(np.argmax(row)))
        return out

    def loss(self, tokens) -> float:
        """Mean next-token cross-entropy (nats) over ``tokens`` (one sequence)."""
        ids = np.asarray(tokens, np.int64).reshape(-1)
        logits, _ = self.forward(ids[:-1])
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
