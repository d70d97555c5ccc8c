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


# -- Hugging Face datasets as corpora (the datasets extra) -----------------------------------------


@pytest.fixture(scope="module")
def shakespeare_dataset(tmp_path_factory):
    """The first 300 speeches of tinyshakespeare, one per row, written four ways by ``datasets``
    (save_to_disk of a Dataset and of a DatasetDict, parquet, arrow) and as one .txt file per speech."""
    import datasets

    root = tmp_path_factory.mktemp("hfdata")
    speeches = SHAKESPEARE.read_text().split("\n\n")[:300]
    ds = datasets.Dataset.from_dict({"id": list(range(len(speeches))), "text": speeches})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "saved_dict"))
    ds.to_parquet(str(root / "speeches.parquet"))
    arrow = sorted((root / "saved").glob("*.arrow"))
    assert len(arrow) == 1
    (root / "txt").mkdir()
    for i, s in enumerate(speeches):
        (root / "txt" / f"{i:04d}.txt").write_text(s)
    return root, arrow[0]


def test_a_dataset_gives_the_tokens_of_the_same_text_read_from_txt_files(shakespeare_dataset, cache):
    root, arrow = shakespeare_dataset
    want_train, want_valid, txt_hash = load_tokens(DataConfig(corpus=str(root / "txt"), seq_len=32))
    hashes = set()
    for corpus in (root / "saved", root / "saved_dict", root / "speeches.parquet", arrow):
        train, valid, h = load_tokens(DataConfig(corpus=str(corpus), seq_len=32))
        assert np.array_equal(train, want_train) and np.array_equal(valid, want_valid), corpus
        hashes.add(h)
    assert len(hashes) == 1 and txt_hash not in hashes          # keyed on the rows' content
    assert (cache / f"tokens-{hashes.pop()}-byte.npy").is_file()


def test_a_run_trains_from_a_save_to_disk_folder(shakespeare_dataset, tmp_path, cache):
    from moe_scaling.config import ModelConfig, TrainConfig
    from moe_scaling.train.loop import train

    root, _ = shakespeare_dataset
    data = DataConfig(corpus=str(root / "saved"), seq_len=32)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=64, n_experts=4, top_k=1)
    r = train(cfg, TrainConfig(tokens=20 * 4 * 32, batch_size=4, lr=3e-3, eval_every=20, eval_batches=1),
              data, ckpt_dir=tmp_path / "ckpt", progress=False)
    assert r.status == "completed" and r.final_eval_loss < r.curve[0]["eval_loss"]
    assert r.corpus_hash == load_tokens(data)[2]


def test_a_changed_dataset_changes_the_hash(shakespeare_dataset, tmp_path, cache):
    import datasets

    root, _ = shakespeare_dataset
    ds = datasets.load_from_disk(str(root / "saved"))
    edited = ds.map(lambda row: {"text": row["text"].upper() if row["id"] == 7 else row["text"]})
    edited.save_to_disk(str(tmp_path / "edited"))
    assert load_tokens(DataConfig(corpus=str(tmp_path / "edited"), seq_len=32))[2] != \
        load_tokens(DataConfig(corpus=str(root / "saved"), seq_len=32))[2]


@pytest.mark.parametrize("corpus, fragment", [
    ("hf:nobody-here/no-such-dataset", "could not be reached"),
    ("hf:", "write hf:NAME[:SPLIT][:COLUMN]"),
    ("hf:a::text", "write hf:NAME[:SPLIT][:COLUMN]"),
])
def test_an_unreachable_hub_dataset_is_one_line_and_exit_2(tmp_path, corpus, fragment):
    """Offline (HF_HUB_OFFLINE=1, as on a machine without network), moe-train says so in one line."""
    import os
    import subprocess
    import sys

    import yaml
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                             "d_ff": 64},
                                   "train": {"tokens": 4096, "batch_size": 4},
                                   "data": {"corpus": corpus, "seq_len": 32}}))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOE_SCALING_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "moe_scaling.cli.train", str(run), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in r.stderr.splitlines() if not line.startswith("stage train:")]  # progress
    assert r.returncode == 2 and len(errors) == 1 and fragment in errors[0], r.stderr
    assert errors[0].startswith("moe-train: error: data.corpus = ")


def test_a_dataset_without_a_text_column_names_its_columns(tmp_path, cache):
    import datasets

    datasets.Dataset.from_dict({"a": ["x"], "b": ["y"], "n": [1]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ConfigError, match=r"string columns: a, b\); name it"):
        load_tokens(DataConfig(corpus=str(tmp_path / "t.parquet"), seq_len=4))
