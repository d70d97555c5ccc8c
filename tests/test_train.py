"""The trainer: determinism, bit-exact resume, divergence, schedules and the result record."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import SHARED_DATA, damage_checkpoint
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError
from moe_scaling.train.checkpoints import load_checkpoint
from moe_scaling.train.data import corpus_content_hash
from moe_scaling.train.loop import train
from moe_scaling.train.step import lr_schedule

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4,
                    top_k=2, d_expert=32, n_shared=1, max_seq_len=32)
DATA = DataConfig(corpus=str(SHARED_DATA / "text" / "tinyshakespeare" / "input.txt"), seq_len=32,
                  max_tokens=60_000)


def _train_cfg(steps, **kw):
    base = dict(tokens=steps * 4 * 32, batch_size=4, lr=3e-3, warmup=2, eval_every=4,
                eval_batches=2, log_every=1, ckpt_every=3, seed=0)
    return TrainConfig(**{**base, **kw})


def _losses(result):
    return [(r["step"], r["train_loss"], r["eval_loss"]) for r in result.curve]


def _params(ckpt_dir, train_cfg):
    model, record = load_checkpoint(ckpt_dir, MODEL, train_cfg, DATA)
    return jax.tree.leaves(nnx.state(model, nnx.Param)), record


def _same(a, b):
    """Bit-identical floats, NaN equal to NaN."""
    return len(a) == len(b) and all(
        x[0] == y[0] and all((u == v) or (math.isnan(u) and math.isnan(v)) for u, v in zip(x[1:], y[1:]))
        for x, y in zip(a, b))


def test_same_seed_gives_bit_identical_losses_and_a_complete_record(tmp_path):
    logs = []
    cfg = _train_cfg(8)
    a = train(MODEL, cfg, DATA, progress=True, on_log=logs.append)
    b = train(MODEL, cfg, DATA, progress=False)
    assert a.status == "completed" and a.steps == 8 and a.tokens == 8 * 4 * 32
    assert _same(_losses(a), _losses(b))
    assert a.curve[0]["step"] == 0 and math.isnan(a.curve[0]["train_loss"])
    # untrained: near uniform. Logits at init have sd s << 1 (fan-in scaled weights), and the expected
    # excess loss over log(256) is ~s^2 / 2: 0.1 nats allows s up to 0.45
    assert a.curve[0]["eval_loss"] == pytest.approx(math.log(256), abs=0.1)
    assert [r["step"] for r in a.curve] == list(range(9))
    assert a.final_eval_loss == a.curve[-1]["eval_loss"] < a.curve[0]["eval_loss"]
    assert a.best_eval_loss == min(r["eval_loss"] for r in a.curve if not math.isnan(r["eval_loss"]))
    assert a.final_train_loss == a.curve[-1]["train_loss"] and a.diverged_step is None
    assert a.corpus_hash and a.step_time_s > 0 and a.tokens_per_s > 0 and a.wall_s >= a.step_time_s
    load = a.metrics["expert_load"]
    assert len(load) == 4 and sum(load) == pytest.approx(1.0)
    assert 0.0 <= a.metrics["dropped_fraction"] <= 1.0 and a.metrics["aux_loss"] >= 1.0 - 1e-6
    assert a.metrics["dispatch"] == "capacity" and a.metrics["eval_dispatch"] == "dropless"
    assert [r["step"] for r in logs if "train_loss" in r] == list(range(1, 9))
    assert [r["step"] for r in logs if "eval_loss" in r] == [0, 4, 8]


def test_resume_is_bit_exact(tmp_path):
    cfg = _train_cfg(10, schedule="wsd", log_every=2)
    straight = train(MODEL, cfg, DATA, ckpt_dir=tmp_path / "straight", progress=False)
    first = train(MODEL, cfg, DATA, ckpt_dir=tmp_path / "resumed", progress=False, stop_at_step=5)
    assert first.status == "stopped" and first.steps == 5
    # resumed with another checkpoint interval (it changes nothing the run computes)
    second = train(MODEL, dataclasses.replace(cfg, ckpt_every=4), DATA, ckpt_dir=tmp_path / "resumed", progress=False)
    assert second.status == "completed" and second.steps == 10 and second.tokens == straight.tokens
    assert _same(_losses(second), _losses(straight))
    p_straight, rec = _params(tmp_path / "straight", cfg)
    p_resumed, _ = _params(tmp_path / "resumed", cfg)
    for u, v in zip(p_straight, p_resumed):
        np.testing.assert_array_equal(u, v)
    assert rec["step"] == 10 and rec["status"] == "completed"
    # A finished run returns its record without training again.
    again = train(MODEL, cfg, DATA, ckpt_dir=tmp_path / "resumed", progress=False)
    assert again.status == "completed" and again.step_time_s == 0.0
    assert _same(_losses(again), _losses(straight)) and again.final_eval_loss == straight.final_eval_loss
    with pytest.raises(ConfigError, match="different configs"):
        train(MODEL, _train_cfg(10, lr=1e-3), DATA, ckpt_dir=tmp_path / "resumed", progress=False)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd):
    """A truncated data file in the newest checkpoint (step 7): the run resumes from step 6, says so
    in one line, keeps the damaged folder aside and ends bit-identical to a straight run."""
    cfg = _train_cfg(10)
    straight = train(MODEL, cfg, DATA, progress=False)
    ckpt = tmp_path / "ckpt"
    assert train(MODEL, cfg, DATA, ckpt_dir=ckpt, progress=False, stop_at_step=7).steps == 7
    assert sorted(p.name for p in ckpt.iterdir()) == ["6", "7"]          # max_to_keep=2: one to fall back to
    damage_checkpoint(ckpt / "7", "truncate")
    capfd.readouterr()
    resumed = train(MODEL, cfg, DATA, ckpt_dir=ckpt, progress=False)
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint step 7 in {ckpt} does not restore"), lines
    assert resumed.status == "completed" and _same(_losses(resumed), _losses(straight))
    assert resumed.tokens_per_s * resumed.step_time_s == pytest.approx(4 * 4 * 32)   # trained steps 7-10
    assert (ckpt / "damaged" / "7").is_dir() and sorted(p.name for p in ckpt.iterdir()) == ["10", "9", "damaged"]


def test_nan_loss_ends_the_run_as_diverged():
    cfg = _train_cfg(6, lr=1e30, warmup=0, grad_clip=0.0)
    r = train(MODEL, cfg, DATA, progress=False)
    assert r.status == "diverged"
    assert r.diverged_step is not None and 1 <= r.diverged_step <= 6 and r.steps == r.diverged_step
    assert r.last_good_loss is None or math.isfinite(r.last_good_loss)
    assert not math.isfinite(r.curve[-1]["train_loss"]) and r.curve[-1]["step"] == r.diverged_step


def test_dense_model_and_bad_inputs():
    dense = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    r = train(dense, _train_cfg(2, eval_every=100), DATA, progress=False)
    assert r.status == "completed" and "expert_load" not in r.metrics
    assert not math.isnan(r.final_eval_loss)  # the last step is always evaluated
    with pytest.raises(ConfigError, match="vocab_size"):
        train(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2), _train_cfg(2), DATA, progress=False)
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=16),
              _train_cfg(2), DATA, progress=False)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup=0.1, schedule=schedule, decay_fraction=0.5)
    lr = lr_schedule(cfg, 100)
    values = [float(lr(t)) for t in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # 10 warmup steps
    assert max(values) == pytest.approx(1.0)
    if schedule == "constant":
        assert values[-1] == pytest.approx(1.0)
    else:
        assert values[-1] == pytest.approx(0.1, abs=1e-6)                    # float32 schedule: eps x 1
        assert all(a >= b - 1e-7 for a, b in zip(values[10:], values[11:]))  # never rises
    if schedule == "wsd":
        assert values[49] == pytest.approx(1.0) and values[75] < 1.0


def test_resume_on_a_changed_corpus_is_a_config_error_naming_both_hashes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (SHARED_DATA / "text" / "tinyshakespeare" / "input.txt").read_text()[:12_000]
    (corpus / "a.txt").write_text(text[:6_000])
    (corpus / "b.txt").write_text(text[6_000:])
    data = DataConfig(corpus=str(corpus), seq_len=32)
    cfg = _train_cfg(6)
    first = train(MODEL, cfg, data, ckpt_dir=tmp_path / "ckpt", progress=False, stop_at_step=3)
    assert first.status == "stopped" and first.steps == 3
    (corpus / "b.txt").write_text(text[6_000:].upper())          # same size, other content
    with pytest.raises(ConfigError) as err:
        train(MODEL, cfg, data, ckpt_dir=tmp_path / "ckpt", progress=False)
    message = str(err.value)
    new_hash = corpus_content_hash(str(corpus))
    assert "\n" not in message and f"data.corpus = {str(corpus)!r}" in message
    assert first.corpus_hash[:8] in message and new_hash[:8] in message and new_hash != first.corpus_hash
    assert "restore the original corpus" in message and "new --out" in message
    # Restoring the corpus resumes the run.
    (corpus / "b.txt").write_text(text[6_000:])
    assert train(MODEL, cfg, data, ckpt_dir=tmp_path / "ckpt", progress=False).status == "completed"


PROGRAM_RUN = """
import json, sys
from moe_scaling.runtime import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.train.loop import train
model = ModelConfig(**json.loads(sys.argv[2]))
r = train(model, TrainConfig(**json.loads(sys.argv[3])), DataConfig(**json.loads(sys.argv[4])), progress=False)
print(json.dumps({"loss": r.final_eval_loss, "compile_s": r.metrics["compile_s"]}))
"""


def test_program_cache_writes_fresh_compilations_only(tmp_path):
    """``loop.compiled``'s own cache (``<jax cache>/programs/``): a cold process writes the train and
    eval programs; a process that finds them loads them; a process whose compilation JAX's cache
    serves writes nothing (an executable deserialized from JAX's cache and serialized again can lack
    kernels on XLA:CPU). Same losses every time (same machine), each process fresh."""
    import json
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "cache"
    args = [json.dumps(dataclasses.asdict(MODEL)), json.dumps(dataclasses.asdict(_train_cfg(4))),
            json.dumps(dataclasses.asdict(DATA))]

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", PROGRAM_RUN, str(cache), *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold = run()
    written = sorted(p.name for p in (cache / "programs").iterdir())
    assert [n.split("-")[0] for n in written] == ["eval", "train"]
    shutil.move(cache / "programs", tmp_path / "kept")
    served = run()                                            # JAX's cache serves both compilations
    assert not (cache / "programs").exists() or not any((cache / "programs").iterdir())
    shutil.rmtree(cache / "programs", ignore_errors=True)
    shutil.move(tmp_path / "kept", cache / "programs")
    loaded = run()                                            # the fresh files, run by another process
    assert cold["loss"] == served["loss"] == loaded["loss"]
