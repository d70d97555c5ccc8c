"""Tokenizers: byte, bpe:N trained on the corpus and cached by corpus hash and N, tokenizer.json
files; the vocabulary check names the fix."""

import pytest

from moe_scaling.config import DataConfig
from moe_scaling.errors import ConfigError
from moe_scaling.train.data import load_tokens, tokenizer_for, tokenizer_vocab_size
from moe_scaling.train.tokenizers import check_vocab, load_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 400 + "über naïve café — ünïcödé"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_SCALING_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    return path


def test_bpe_is_trained_once_and_cached(corpus, tmp_path):
    data = DataConfig(corpus=str(corpus), tokenizer="bpe:300", seq_len=16)
    tok = tokenizer_for(data)
    assert tok.vocab_size == 300 and tok.eos == 0 and tokenizer_vocab_size("bpe:300") == 300
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe-*-300.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert tokenizer_for(data).json_text == tok.json_text and cached[0].stat().st_mtime_ns == mtime
    train, valid, _ = load_tokens(data)
    assert train.max() < 300 and len(train) + len(valid) < len(TEXT.encode())   # merges compress
    assert tok.decode(tok.hf.encode(TEXT[:200]).ids) == TEXT[:200]               # byte-level: lossless
    corpus.write_text(TEXT + " changed")                                          # new corpus hash: new file
    tokenizer_for(data)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("bpe-*-300.json"))) == 2


def test_tokenizer_json_file(corpus, tmp_path):
    tok = tokenizer_for(DataConfig(corpus=str(corpus), tokenizer="bpe:280", seq_len=16))
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.json_text)
    same = load_tokenizer(str(path))
    assert same.eos == 0 and same.hf.encode("the fox").ids == tok.hf.encode("the fox").ids
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("spec", ["bpe", "bpe:100", "bpe:x", "sentencepiece", ""])
def test_bad_tokenizer_is_one_line(spec):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        DataConfig(tokenizer=spec)


def test_vocab_check_names_the_fix():
    tok = load_tokenizer("byte")
    check_vocab(256, tok)
    with pytest.raises(ConfigError, match=r"model.vocab_size = 128256: .* set model.vocab_size: 256"):
        check_vocab(128256, tok)
