"""bench/moe_overhead.py --peer: the transformers child process serves real training steps of the
same model, and the peer columns are medians of interleaved ratios."""

import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
moe_overhead = pytest.importorskip("moe_overhead")

from moe_scaling.config import ModelConfig  # noqa: E402


def test_peer_result_is_the_fastest_implementation_and_a_median_of_paired_ratios():
    ours = [1.0, 2.0, 1.0, 1.0, 4.0]  # a load burst hits step 1 (ours and the peer alike) and 4
    fast = SimpleNamespace(times=[2.0, 4.0, 2.0, 3.0, 8.0], info={"experts_implementation": "grouped_mm"})
    slow = SimpleNamespace(times=[3.0, 6.0, 4.0, 4.0, 9.0], info={"experts_implementation": "eager"})
    r = moe_overhead.peer_result(ours, [slow, fast], tokens=100)
    assert r["peer_experts"] == "grouped_mm"
    assert r["speedup_over_peer"] == statistics.median([2.0, 2.0, 2.0, 3.0, 2.0]) == 2.0
    assert r["peer_tokens_per_s"] == pytest.approx(100 / 3.0)
    assert r["median_tokens_per_s"] == pytest.approx(100 / 1.0)
    assert r["peer_tokens_per_s_by_experts"] == pytest.approx({"grouped_mm": 100 / 3.0, "eager": 100 / 4.0})
    assert moe_overhead.peer_result(ours, [], tokens=100) == {}


def test_peer_child_trains_the_same_model_in_transformers():
    pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, n_experts=4, top_k=2,
                      d_expert=16, max_seq_len=16)
    peer = moe_overhead.Peer(cfg, batch=2, seq=16, experts="grouped_mm")
    try:
        peer.run(2)
        assert len(peer.times) == 2 and all(t > 0 for t in peer.times)
        assert peer.info["experts_implementation"] == "grouped_mm"
        assert peer.info["n_params"] == cfg_param_count(cfg)
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def cfg_param_count(cfg: ModelConfig) -> int:
    from moe_scaling.costs import param_counts
    return param_counts(cfg).total
