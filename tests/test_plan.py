"""moe-train --plan: the train step compiled on abstract arrays for a mesh of host devices, XLA's
per-device bytes beside the analytic estimate; nothing is allocated."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RUN_YAML = """\
model: {vocab_size: 512, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 256, n_experts: 8,
        top_k: 2, d_expert: 64, n_shared: 1, router: sigmoid, router_bias: true, max_seq_len: 128}
train: {tokens: 1000000, batch_size: 8, dispatch: capacity}
data: {seq_len: 128}
"""


def _plan(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    p = subprocess.run([sys.executable, "-m", "moe_scaling.cli.train", *args, "--plan", "--json"], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def test_plan_small_model_on_8_devices(tmp_path):
    target = tmp_path / "run.yaml"
    target.write_text(RUN_YAML)
    r = _plan([str(target), "--mesh", "fsdp=4,expert=2", "--device-memory", "1MB"])
    assert r["devices"] == 8 and r["mesh"] == "data=1,fsdp=4,expert=2"
    x, a = r["xla"], r["analytic"]
    # the state's shards are counted exactly (the same partition rules), the optimizer is 2 moments;
    # 1% allows XLA's buffer alignment (a byte count, not a timing: the same on every CPU)
    assert x["params"] == pytest.approx(a["params"], rel=0.01)
    assert x["optimizer"] == pytest.approx(a["optimizer"], rel=0.01)
    assert x["temporaries"] > 0 and x["total"] >= x["params"] + x["optimizer"]
    assert r["fits"] is False and r["device_memory"] == 1_000_000


def test_plan_mobilemoe_l_widths_on_8_devices(tmp_path):
    """MobileMoE-L as `moe-build --active 922M --total 5.3B --granularity 8 --shared 1` writes it
    (d 1280, 60 experts of 640 top-4 + a shared 2560, vocab 128,256), with 2 of its 32 layers so that
    the compile takes seconds, on fsdp=8 at 8 x 1024 tokens: XLA's per-device bytes are within 20% of
    the analytic estimate (the full 32-layer model: 35.6 vs 36.8 GB, README)."""
    import yaml

    from moe_scaling.design.builder import build, config_from_spec

    build(config_from_spec("922M", "5.3B", granularity=8, shared=1).config, tmp_path / "mml")
    model = yaml.safe_load((tmp_path / "mml" / "model.yaml").read_text())["model"]
    assert (model["d_model"], model["n_experts"], model["d_expert"], model["d_shared"], model["vocab_size"]) == \
        (1280, 60, 640, 2560, 128256) and model["n_layers"] == 32
    target = tmp_path / "run.yaml"
    target.write_text(yaml.safe_dump({"model": {**model, "n_layers": 2},
                                      "train": {"batch_size": 8, "dispatch": "capacity"}, "data": {"seq_len": 1024}}))
    r = _plan([str(target), "--mesh", "fsdp=8", "--device-memory", "80GB"])
    assert r["devices"] == 8 and r["model"]["n_layers"] == 2 and r["fits"] is True
    assert r["xla"]["params"] == pytest.approx(r["analytic"]["params"], rel=0.01)
    assert 0.8 <= r["xla_over_analytic"] <= 1.2, (r["xla"], r["analytic"])
