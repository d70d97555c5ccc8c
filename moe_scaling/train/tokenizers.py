"""Tokenizers: ``DataConfig.tokenizer`` is ``byte``, a Hugging Face ``tokenizer.json`` path, or
``bpe:N``.

* ``byte``: UTF-8 bytes are the ids 0..255 (no file; EOS is byte 0).
* a path to a ``tokenizer.json`` (the Hugging Face ``tokenizers`` format): used as it is. Its
  end-of-text token (the first of :data:`EOS_NAMES` it has) separates documents; without one,
  documents are simply concatenated.
* ``bpe:N``: a byte-level BPE with a vocabulary of N ids (``<|endoftext|>`` is id 0, then the 256
  byte symbols, then merges), trained on the corpus with the ``tokenizers`` library and cached as
  ``$MOE_SCALING_CACHE/tokenizers/bpe-<corpus hash>-<N>.json``: the same corpus and N give the
  same file, and a changed corpus a new one. A small corpus may have fewer than N - 257 merges
  to learn; the vocabulary is N ids all the same (the embedding table's size), some never used.

A model's ``vocab_size`` must equal its tokenizer's (:func:`check_vocab`); the error says which
number to change.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_scaling.errors import ConfigError

__all__ = ["Tokenizer", "parse_tokenizer", "load_tokenizer", "tokenizer_vocab_size", "check_vocab", "EOS_NAMES",
           "BPE_EOS"]

BPE_EOS = "<|endoftext|>"
EOS_NAMES = (BPE_EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_BPE_RE = re.compile(r"^bpe:(\d+)$")
MIN_BPE = 257  # EOS + 256 byte symbols


def parse_tokenizer(spec: str, field: str = "data.tokenizer") -> tuple[str, int | str | None]:
    """``("byte", None)``, ``("bpe", N)`` or ``("file", path)``; a one-line ConfigError otherwise
    (the file itself is read by :func:`load_tokenizer`)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{field} = {spec!r}: must be byte, bpe:N or a tokenizer.json path")
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe"):
        m = _BPE_RE.match(spec)
        if not m or int(m[1]) < MIN_BPE:
            raise ConfigError(f"{field} = {spec!r}: write bpe:N with N >= {MIN_BPE} (end-of-text + 256 "
                              "bytes + merges), e.g. bpe:8192")
        return "bpe", int(m[1])
    if spec.endswith(".json"):
        return "file", spec
    raise ConfigError(f"{field} = {spec!r}: unknown tokenizer; use byte, bpe:N or a path to a "
                      "Hugging Face tokenizer.json")


@dataclass
class Tokenizer:
    """A resolved tokenizer: ``vocab_size`` ids, ``eos`` (or None) and, for a real tokenizer, the
    ``tokenizers.Tokenizer`` and its JSON text (what ``moe-export`` writes beside the weights)."""

    spec: str
    vocab_size: int
    eos: int | None
    key: str                       # file-name-safe id of this exact tokenizer (token caches)
    hf: object | None = None       # tokenizers.Tokenizer
    json_text: str | None = None

    def encode_documents(self, docs: list[bytes]) -> np.ndarray:
        """Token ids of the documents joined with ``eos`` (uint8 / uint16 / uint32)."""
        if self.hf is None:
            return np.frombuffer(bytes([self.eos]).join(docs), dtype=np.uint8).copy()
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        parts = []
        for i, enc in enumerate(self.hf.encode_batch(texts, add_special_tokens=False)):
            if i and self.eos is not None:
                parts.append(np.array([self.eos], np.int64))
            parts.append(np.asarray(enc.ids, np.int64))
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return ids.astype(np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.hf is None:
            return bytes(ids).replace(bytes([0]), b"\n").decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)


def _from_json_text(spec: str, text: str, vocab_size: int | None, key: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(text)
    eos = next((hf.token_to_id(n) for n in EOS_NAMES if hf.token_to_id(n) is not None), None)
    return Tokenizer(spec, vocab_size or hf.get_vocab_size(with_added_tokens=True), eos, key, hf, text)


def train_bpe(docs: list[bytes], n: int) -> str:
    """The JSON text of a byte-level BPE of (at most) ``n`` ids trained on ``docs``."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in docs), trainer=trainer)
    return tok.to_str()


def load_tokenizer(spec: str, *, corpus_hash: str | None = None, docs=None, cache: Path | None = None,
                   field: str = "data.tokenizer") -> Tokenizer:
    """Resolve ``spec``. ``bpe:N`` needs the corpus: ``corpus_hash`` names the cache file and
    ``docs()`` (a callable returning the documents as bytes) is called only to train a missing one."""
    kind, arg = parse_tokenizer(spec, field)
    if kind == "byte":
        return Tokenizer(spec, 256, 0, "byte")
    if kind == "file":
        path = Path(arg).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field} = {spec!r}: no such file; give the path of a tokenizer.json")
        text = path.read_text()
        key = "tok" + hashlib.sha256(text.encode()).hexdigest()[:12]
        try:
            return _from_json_text(spec, text, None, key)
        except Exception as err:  # noqa: BLE001 - the library raises plain Exceptions
            raise ConfigError(f"{field} = {spec!r}: not a tokenizers JSON file ({str(err).splitlines()[0]}); "
                              "give a Hugging Face tokenizer.json") from None
    if corpus_hash is None or cache is None:
        raise ValueError("bpe:N needs corpus_hash and cache")
    path = Path(cache) / "tokenizers" / f"bpe-{corpus_hash}-{arg}.json"
    if not path.is_file():
        from moe_scaling.files import atomic_write_text
        atomic_write_text(path, train_bpe(docs(), arg))
    return _from_json_text(spec, path.read_text(), arg, f"bpe{arg}")


def tokenizer_vocab_size(spec: str, field: str = "data.tokenizer") -> int:
    """The number of ids ``spec`` gives, known before any corpus is read: 256 for ``byte``, N for
    ``bpe:N``, the file's own count for a ``tokenizer.json`` (one-line ConfigError otherwise)."""
    kind, arg = parse_tokenizer(spec, field)
    if kind == "bpe":
        return int(arg)
    return load_tokenizer(spec, field=field).vocab_size


def check_vocab(vocab_size: int, tok: Tokenizer) -> None:
    """One-line ConfigError unless the model's ``vocab_size`` equals the tokenizer's."""
    if vocab_size != tok.vocab_size:
        raise ConfigError(f"model.vocab_size = {vocab_size}: the tokenizer {tok.spec!r} has {tok.vocab_size} "
                          f"ids; set model.vocab_size: {tok.vocab_size} (or use a tokenizer of "
                          f"{vocab_size} ids, e.g. bpe:{vocab_size})")
