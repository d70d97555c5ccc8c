"""Corpora, byte tokenizer, content-hash cache, split and deterministic batches."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from moe_scaling.config import DataConfig
from moe_scaling.errors import ConfigError
from moe_scaling.train.data import (EOS, corpus_files, decode, encode, eval_windows, load_tokens,
                              train_batch)

SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare" / "input.txt"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOE_SCALING_CACHE", str(d))
    return d


def test_stdlib_corpus_is_the_running_interpreters_source(cache):
    files = corpus_files("stdlib")
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    assert not any(part in ("site-packages", "test", "__pycache__") for r in rel for part in r.split("/")[:-1])
    cfg = DataConfig(corpus="stdlib", seq_len=64)
    train, valid, h = load_tokens(cfg)
    assert train.dtype == np.uint8 and len(train) > 1_000_000
    assert len(valid) == round((len(train) + len(valid)) * cfg.valid_fraction)
    # The stream starts with the first file's text; documents are joined by EOS.
    first = files[0].read_bytes()
    assert bytes(train[: len(first)]) == first and train[len(first)] == EOS
    train2, valid2, h2 = load_tokens(cfg)
    assert h2 == h and np.array_equal(train, train2) and np.array_equal(valid, valid2)
    assert len(list(cache.glob(f"tokens-{h}-byte.npy"))) == 1


def test_shared_corpus_split_and_max_tokens(cache):
    train, valid, h = load_tokens(DataConfig(corpus=str(SHAKESPEARE), seq_len=32, valid_fraction=0.1))
    text = SHAKESPEARE.read_bytes()
    assert bytes(np.concatenate([train, valid])) == text
    assert len(valid) == round(len(text) * 0.1)
    t2, v2, h2 = load_tokens(DataConfig(corpus=str(SHAKESPEARE), seq_len=32, max_tokens=10_000))
    assert h2 == h and len(t2) + len(v2) == 10_000 and bytes(t2[:100]) == text[:100]


def test_directory_and_glob_corpora(cache):
    folder = SHARED_DATA / "text" / "tinystories"
    by_dir = load_tokens(DataConfig(corpus=str(folder), seq_len=32))
    by_glob = load_tokens(DataConfig(corpus=str(folder / "*.txt"), seq_len=32))
    assert by_dir[2] == by_glob[2]
    names = [p.name for p in corpus_files(str(folder))]
    assert names == ["train.txt", "valid.txt", "valid_official_head.txt"]  # README.md, MD5SUMS left out


def test_cache_is_keyed_by_content(tmp_path, cache):
    f = tmp_path / "corpus.txt"
    f.write_text("hello world " * 200)
    cfg = DataConfig(corpus=str(f), seq_len=16)
    _, _, h1 = load_tokens(cfg)
    entry = cache / f"tokens-{h1}-byte.npy"
    assert entry.is_file()
    # The cache entry is what is read back for unchanged content ...
    np.save(entry, np.full(2400, ord("z"), np.uint8))
    train, _, _ = load_tokens(cfg)
    assert set(train.tolist()) == {ord("z")}
    # ... and a changed file has another hash, hence another entry.
    f.write_text("goodbye world " * 200)
    train, _, h2 = load_tokens(cfg)
    assert h2 != h1 and bytes(train[:7]) == b"goodbye"
    assert (cache / f"tokens-{h2}-byte.npy").is_file()


def test_jsonl_and_npy_corpora(tmp_path, cache):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"story {i} é"}) for i in range(100)) + "\n")
    train, valid, _ = load_tokens(DataConfig(corpus=str(f), seq_len=8))
    stream = bytes(np.concatenate([train, valid]))
    assert stream.split(bytes([EOS]))[:2] == ["story 0 é".encode(), "story 1 é".encode()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_tokens(DataConfig(corpus=str(bad), seq_len=8))
    ids = np.arange(5000) % 1000
    np.save(tmp_path / "ids.npy", ids)
    train, valid, _ = load_tokens(DataConfig(corpus=str(tmp_path / "ids.npy"), seq_len=8))
    assert train.dtype == np.uint16 and np.array_equal(np.concatenate([train, valid]), ids)


def test_bad_corpora_are_one_line_config_errors(tmp_path, cache):
    with pytest.raises(ConfigError, match="no such file"):
        load_tokens(DataConfig(corpus=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="matches no"):
        load_tokens(DataConfig(corpus=str(tmp_path / "*.txt")))
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(ConfigError, match="fewer than one window"):
        load_tokens(DataConfig(corpus=str(small), seq_len=16))


def test_batches_are_deterministic_windows():
    tokens = np.arange(10_000, dtype=np.int64).astype(np.uint16)
    x, y = train_batch(tokens, 4, 16, seed=1, step=5)
    x2, y2 = train_batch(tokens, 4, 16, seed=1, step=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.dtype == np.int32 and x.shape == (4, 16)
    assert np.array_equal(y[:, :-1], x[:, 1:]) and np.all(y[:, 0] == x[:, 0] + 1)
    assert not np.array_equal(train_batch(tokens, 4, 16, seed=1, step=6)[0], x)
    assert not np.array_equal(train_batch(tokens, 4, 16, seed=2, step=5)[0], x)
    ev = eval_windows(tokens, 4, 16, 3)
    assert len(ev) == 3 and ev[0][0][0, 0] == 0 and ev[-1][1][-1, -1] == 9999
    assert decode(encode("héllo")) == "héllo"
