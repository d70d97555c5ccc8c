"""bench/gpu.py, the prepared GPU session of issue 24 item 5, at tiny size on CPU, so that it cannot rot
before a GPU runs it: every part runs, the JSON has its schema, and (a)'s ragged and no-drop capacity
losses agree within the script's stated bf16 tolerance."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_bench_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    # what ran, where: on CPU the JSON says these are not GPU figures
    assert doc["device"] == "cpu" and doc["platform"] == "cpu" and doc["gpu_figures"] is False
    assert "not GPU figures" in doc["note"]
    assert doc["tiny"] is True and {"cpu", "isa", "load_1min", "code_version"} <= set(doc["machine"])
    parts = doc["parts"]
    assert set(parts) == {"ragged_vs_capacity", "mfu", "seed_batching"}
    assert all(p["ok"] for p in parts.values()), {k: p.get("error") for k, p in parts.items()}

    # (a) ragged (jax.lax.ragged_dot runs on CPU too) against capacity at factor E / k: nothing drops,
    # and the 5 losses agree within 2^-9 x 2 x 2 x n_moe_layers of the loss (the script's docstring)
    a = parts["ragged_vs_capacity"]
    assert a["steps"] == 5 and a["capacity_factor"] == a["model"]["n_experts"] / a["model"]["top_k"]
    assert a["nothing_dropped"] and not any(a["runs"]["capacity_bf16"]["dropped_fraction"])
    ragged, cap = a["runs"]["ragged_bf16"]["losses"], a["runs"]["capacity_bf16"]["losses"]
    assert len(ragged) == len(cap) == len(a["runs"]["capacity_f32"]["losses"]) == 5
    assert all(math.isfinite(v) for v in ragged + cap)
    rel = 2.0 ** -9 * 2 * 2 * a["model"]["n_layers"]
    assert a["relative_tolerance"] == rel and "2^-9" in a["tolerance_source"]
    for r, c in zip(ragged, cap):
        assert abs(r - c) <= rel * abs(c), (ragged, cap)
    assert a["within_tolerance"] and a["max_diff_over_tolerance"] <= 1.0

    # (b) a timed row per dispatch, FLOPs from the cost model; no MFU without a known peak on CPU
    b = parts["mfu"]
    assert [r["dispatch"] for r in b["rows"]] == ["ragged", "capacity"]
    assert b["peak_tflops"] is None and "--peak-tflops" in b["peak_source"] and b["target_mfu"] == 0.35
    for r in b["rows"]:
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None
        assert r["flops_per_step"] == b["flops_per_token_training"] * r["tokens_per_step"]

    # (c) the 2-run grid through moe-sweep run, batched (one group of 2) and --no-batch
    c = parts["seed_batching"]
    assert c["complete"] and c["ratio"] > 0 and c["target"] == 1.8
    (size,) = c["sizes"]
    assert size["batched"]["statuses"] == {"completed": 2} == size["no_batch"]["statuses"]
    assert size["batched"]["group_sizes"] == [2] and size["no_batch"]["group_sizes"] == [1]
    assert "--no-batch" in size["no_batch"]["command"] and "--no-batch" not in size["batched"]["command"]
