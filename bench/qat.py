"""Stage-4 QAT benchmark: eval loss of a briefly trained small MoE in float32, after post-training
INT4 quantization (group 32, fp16 scales), and after quantization-aware training.

    python bench/qat.py --json            # writes bench/qat.json

The control ``f32_continued_loss`` trains the float model for the same extra steps as QAT, so
the QAT gain is not mistaken for more training: ``gap_closed`` = (ptq - qat) / (ptq - f32) and
``gap_closed_vs_continued`` = (ptq_continued - qat) / (ptq_continued - f32_continued).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.train.loop import train
from moe_scaling.train.qat import eval_loss, qat

CORPUS = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "tinyshakespeare")

MODEL = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
                    n_experts=8, top_k=2, d_expert=128, n_shared=1, d_shared=128, router="softmax",
                    max_seq_len=128)
DATA = DataConfig(corpus=CORPUS, seq_len=128)
BASE = TrainConfig(tokens=16 * 128 * 600, batch_size=16, lr=3e-3, eval_every=200, eval_batches=8,
                   ckpt_every=10_000, seed=0)
# stage 4: a short run at a low constant-after-warmup learning rate
STAGE4 = dataclasses.replace(BASE, tokens=16 * 128 * 150, lr=3e-4, schedule="cosine", warmup=0.1, seed=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true", help="write bench/qat.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = train(MODEL, BASE, DATA, ckpt_dir=os.path.join(tmp, "base"), progress=False)
        q = qat(MODEL, STAGE4, DATA, os.path.join(tmp, "base"))
        # control: the same extra steps in float (train() from the base checkpoint's weights)
        from moe_scaling.train.checkpoints import load_checkpoint
        import jax
        import optax
        from flax import nnx
        from moe_scaling.train.data import load_tokens, train_batch
        from moe_scaling.train.step import _dtype, loss_fn, make_optimizer
        from moe_scaling.model.routing import resolve_dispatch

        model, _ = load_checkpoint(os.path.join(tmp, "base"), MODEL, BASE, DATA)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        steps = STAGE4.steps(DATA.seq_len)
        tx = make_optimizer(STAGE4, steps)
        opt = tx.init(params)
        kw = dict(dispatch=resolve_dispatch(STAGE4.dispatch), capacity_factor=STAGE4.capacity_factor,
                  dtype=_dtype(STAGE4.dtype))

        @jax.jit
        def step(p, o, x, y):
            f = lambda p: loss_fn(nnx.merge(graphdef, p, rest), x, y, **kw)[0]
            g = jax.grad(f)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        train_tokens, valid_tokens, _ = load_tokens(DATA)
        for s in range(steps):
            x, y = train_batch(train_tokens, STAGE4.batch_size, DATA.seq_len, STAGE4.seed, s)
            params, opt = step(params, opt, x, y)
        cont = nnx.merge(graphdef, params, rest)
        f32_cont = eval_loss(cont, STAGE4, DATA, valid_tokens=valid_tokens)
        ptq_cont = eval_loss(cont, STAGE4, DATA, quantize=True, valid_tokens=valid_tokens)
    f32, ptq, qat_loss = q.initial_eval_loss, q.initial_ptq_loss, q.final_eval_loss
    out = {
        "f32_loss": f32, "ptq_loss": ptq, "qat_loss": qat_loss,
        "f32_continued_loss": f32_cont, "ptq_continued_loss": ptq_cont,
        "ptq_gap": ptq - f32, "qat_gap": qat_loss - f32,
        "gap_closed": (ptq - qat_loss) / (ptq - f32) if ptq != f32 else None,
        "gap_closed_vs_continued": (ptq_cont - qat_loss) / (ptq_cont - f32_cont) if ptq_cont != f32_cont else None,
        "quantization": "int4 symmetric, group 32 along the input axis, fp16 scales; every linear and "
                        "expert weight (embeddings, router, shared gate, norms float32); weights only",
        "model": MODEL.to_dict(), "data": {"corpus": "../shared/data/text/tinyshakespeare", "seq_len": 128,
                                            "tokenizer": "byte"},
        "base_train": {"steps": BASE.steps(128), "tokens": BASE.tokens, "lr": BASE.lr,
                       "final_eval_loss": base.final_eval_loss},
        "qat_train": {"steps": q.steps, "tokens": STAGE4.tokens, "lr": STAGE4.lr, "curve": q.curve},
        "eval": {"windows": BASE.eval_batches * BASE.batch_size, "seq_len": 128, "dispatch": "dropless"},
        "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(__file__).with_name("qat.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
