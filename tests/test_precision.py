"""Mixed precision: ``train.dtype: bfloat16`` computes the matmuls in bfloat16 while parameters,
gradients and AdamW moments stay float32; its losses track the float32 run's."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import SHARED_DATA, seed_spread
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.train.checkpoints import Checkpoints
from moe_scaling.train.loop import train
from moe_scaling.train.step import init_state

MODEL = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, n_experts=4,
                    top_k=2, n_shared=1, router="sigmoid", router_bias=True, max_seq_len=32)
DATA = DataConfig(corpus=str(SHARED_DATA / "text" / "tinyshakespeare" / "input.txt"), seq_len=32,
                  max_tokens=60_000)
# "Tracks" means: switching the matmuls to bfloat16 moves the losses by well under what switching the
# seed does. The seed-to-seed sd of this run's losses (bench/seed_spread.py, 8 seeds of float32):
# final eval 0.028, per-step train 0.018-0.070. BF16_TOL is half the final-eval sd (0.014). Measured
# bf16 - f32: train within 0.0021, final eval within 0.0006, the same on an AVX-512 CPU with bf16
# instructions and under XLA_FLAGS=--xla_cpu_max_isa=AVX2.
BF16_TOL = 0.5 * seed_spread("precision_8_steps")["final_eval_sd"]


def test_bf16_tracks_f32_with_f32_master_weights(tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(tokens=8 * 8 * 32, batch_size=8, lr=3e-3, warmup=1, log_every=1, eval_every=8,
                          eval_batches=1, dtype=dtype, seed=0)
        runs[dtype] = train(MODEL, cfg, DATA, progress=False, ckpt_dir=tmp_path / dtype)
    f32 = np.array([r["train_loss"] for r in runs["float32"].curve[1:]])
    bf16 = np.array([r["train_loss"] for r in runs["bfloat16"].curve[1:]])
    assert len(f32) == 8 and np.all(np.isfinite(bf16))
    assert np.max(np.abs(bf16 - f32)) < BF16_TOL, (bf16 - f32)
    assert abs(runs["bfloat16"].final_eval_loss - runs["float32"].final_eval_loss) < BF16_TOL
    assert not np.array_equal(bf16, f32)            # the bf16 run really computed in bf16
    # master weights and optimiser state are float32 in the bf16 run's checkpoint
    _, state = init_state(MODEL, cfg, 8)
    ckpt = Checkpoints(tmp_path / "bfloat16")
    state, _ = ckpt.restore(ckpt.latest(), state)
    ckpt.close()
    floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(a.dtype == jnp.float32 for a in floats)
