"""Corpora, the byte tokenizer, train/validation split and deterministic batches.

A corpus (``DataConfig.corpus``) is one of:

* ``stdlib``: the Python standard library's own ``.py`` source files, read from the running
  interpreter (``sysconfig``'s ``stdlib`` path; ``site-packages``, test suites and
  ``__pycache__`` excluded), in sorted relative-path order. Real text on every machine, no
  download; its hash depends on the Python version and is recorded with every result.
* a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, its ``text`` field),
  or a ``.npy`` file of pre-tokenized integer ids (1-D);
* a directory (every ``.txt``/``.jsonl`` below it, or every ``.npy``, in sorted order) or a glob
  pattern (``**`` allowed) of such files;
* a Hugging Face dataset: a ``save_to_disk`` folder, a ``.parquet``/``.arrow`` file or
  ``hf:NAME[:SPLIT][:COLUMN]``, one document per row (:mod:`moe_scaling.train.datasets_corpus`).

The ``byte`` tokenizer maps UTF-8 bytes to ids 0..255; documents are joined with byte 0
(``EOS``, which plain text never contains). ``bpe:N`` and ``tokenizer.json`` tokenizers are
:mod:`moe_scaling.train.tokenizers`. Token arrays are cached as ``.npy`` under
``$MOE_SCALING_CACHE`` (default ``~/.cache/moe_scaling``), keyed by the corpus content hash and
the tokenizer: a changed file changes the hash and so the cache entry.

Split: the last ``valid_fraction`` of the tokens is the validation set (after ``max_tokens``
keeps the first tokens). Training batches are random windows drawn from a generator seeded by
``(seed, step)`` (so a resumed run sees exactly the batches it would have seen); the evaluation
set is a fixed list of evenly spaced validation windows, the same for every run on a corpus.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sysconfig
from pathlib import Path

import numpy as np

from moe_scaling.config import DataConfig
from moe_scaling.errors import ConfigError
from moe_scaling.files import atomic_path
from moe_scaling.train.datasets_corpus import dataset_documents, dataset_files, is_dataset_corpus
from moe_scaling.train.tokenizers import Tokenizer, load_tokenizer, parse_tokenizer

__all__ = ["EOS", "BYTE_VOCAB", "load_tokens", "corpus_files", "tokenizer_vocab_size", "tokenizer_for", "encode",
           "decode", "train_batch", "eval_windows", "cache_dir", "corpus_content_hash"]

EOS = 0
BYTE_VOCAB = 256
TEXT_SUFFIXES = (".txt", ".jsonl")
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def tokenizer_vocab_size(tokenizer: str) -> int:
    """Vocabulary size of a tokenizer (``byte``: 256; ``bpe:N``: N; a tokenizer.json: its own)."""
    kind, arg = parse_tokenizer(tokenizer)
    if kind == "byte":
        return BYTE_VOCAB
    if kind == "bpe":
        return arg
    return load_tokenizer(tokenizer).vocab_size


def tokenizer_for(data_cfg: DataConfig, *, cache: str | os.PathLike | None = None) -> Tokenizer:
    """The :class:`~moe_scaling.train.tokenizers.Tokenizer` of ``data_cfg`` (a ``bpe:N`` one is
    trained on the corpus the first time and cached, :mod:`moe_scaling.train.tokenizers`)."""
    kind, _ = parse_tokenizer(data_cfg.tokenizer)
    if kind != "bpe":
        return load_tokenizer(data_cfg.tokenizer)
    corpus_hash = corpus_content_hash(data_cfg.corpus)

    def docs() -> list[bytes]:
        _, content = _read_corpus(data_cfg.corpus)
        if isinstance(content, np.ndarray):
            raise ConfigError(f"data.tokenizer = {data_cfg.tokenizer!r}: the corpus {data_cfg.corpus!r} is "
                              "already token ids (.npy); use a text corpus or tokenizer: byte")
        return content

    return load_tokenizer(data_cfg.tokenizer, corpus_hash=corpus_hash, docs=docs,
                          cache=Path(cache or cache_dir()))


def encode(text: str) -> np.ndarray:
    """Byte-tokenize ``text`` (UTF-8) -> ``uint8`` ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids) -> str:
    """Inverse of :func:`encode` (EOS bytes become newlines, invalid UTF-8 is replaced)."""
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1))
    return data.replace(bytes([EOS]), b"\n").decode("utf-8", errors="replace")


def cache_dir() -> Path:
    """Where token arrays are cached: ``$MOE_SCALING_CACHE`` or ``~/.cache/moe_scaling``."""
    return Path(os.environ.get("MOE_SCALING_CACHE") or Path.home() / ".cache" / "moe_scaling")


def _bad(corpus: str, problem: str) -> ConfigError:
    return ConfigError(f"data.corpus = {corpus!r}: {problem}; give 'stdlib', a .txt/.jsonl/.npy "
                       "file, a directory or a glob of them, or a Hugging Face dataset")


def corpus_files(corpus: str) -> list[Path]:
    """The files of a corpus in their deterministic order (see the module docstring)."""
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for folder, subdirs, names in os.walk(root):  # skipped folders are never entered
            subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]
            files.extend(Path(folder) / n for n in names if n.endswith(".py"))
        files.sort(key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise _bad(corpus, f"no .py files under the interpreter's stdlib {root}")
        return files
    path = Path(corpus).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        below = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in below if p.suffix in TEXT_SUFFIXES] or [p for p in below if p.suffix == ".npy"]
    elif any(ch in corpus for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(corpus), recursive=True)
                       if Path(p).is_file())
    else:
        raise _bad(corpus, "no such file or directory")
    if not files:
        raise _bad(corpus, "matches no .txt, .jsonl or .npy file")
    suffixes = {p.suffix for p in files}
    if not suffixes <= {*TEXT_SUFFIXES, ".npy"} and corpus != "stdlib":
        odd = sorted(suffixes - {*TEXT_SUFFIXES, ".npy"})
        raise _bad(corpus, f"unsupported file type {', '.join(odd)}")
    if ".npy" in suffixes and len(suffixes) > 1:
        raise _bad(corpus, "mixes .npy token files with text files")
    return files


def _documents(path: Path, raw: bytes, corpus: str) -> list[bytes]:
    """The UTF-8 documents of a text file's raw bytes (a .jsonl file: one per line)."""
    if path.suffix != ".jsonl":
        return [raw]
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise _bad(corpus, f"{path}:{lineno} is not a JSON object with a 'text' field") from None
        docs.append(str(text).encode("utf-8"))
    return docs


def _npy_tokens(path: Path, raw: bytes, corpus: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise _bad(corpus, f"{path} is not a readable .npy array ({err})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
        raise _bad(corpus, f"{path} must hold a 1-D array of non-negative integer token ids")
    return arr.astype(np.int64)


def _read_corpus(corpus: str) -> tuple[str, list[bytes] | np.ndarray]:
    """Read a corpus: ``(content hash, its documents)``, or the token ids of a ``.npy`` corpus.

    The hash covers each file's type and bytes in order (not its path), so the same text read
    from another folder has the same hash; a dataset's covers its rows' text in order."""
    h = hashlib.sha256()
    if is_dataset_corpus(corpus):
        docs = dataset_documents(corpus)
        if not docs:
            raise _bad(corpus, "the dataset has no rows of text")
        h.update(b"datasets")
        for doc in docs:
            h.update(len(doc).to_bytes(8, "little")), h.update(doc)
        return h.hexdigest()[:16], docs
    files = corpus_files(corpus)
    digest, raws = _files_hash(files)
    if files[0].suffix == ".npy":
        return digest, np.concatenate([_npy_tokens(p, r, corpus) for p, r in zip(files, raws)])
    return digest, [doc for p, r in zip(files, raws) for doc in _documents(p, r, corpus)]


def _files_hash(files: list[Path]) -> tuple[str, list[bytes]]:
    """The content hash of corpus files (each file's type and bytes in order) and their bytes; it
    reads no document structure, so any file (a chat JSONL as well) has one."""
    h = hashlib.sha256()
    raws = []
    for path in files:
        raw = path.read_bytes()
        h.update(path.suffix.encode()), h.update(len(raw).to_bytes(8, "little")), h.update(raw)
        raws.append(raw)
    return h.hexdigest()[:16], raws


# (corpus, (path, size, mtime_ns) of every file) -> content hash, for this process: a sweep
# trains many runs on one corpus, and re-reading and hashing it (0.25 s for ``stdlib``) was a
# fifth of a small run's fixed cost. Any changed file changes the key, so a stale hash is
# never reused.
_HASHES: dict[tuple, str] = {}


def corpus_content_hash(corpus: str) -> str:
    """The 16-hex-digit content hash of a corpus (:func:`_read_corpus`; what :func:`load_tokens`
    returns and a checkpoint records), reusing this process's earlier result while no
    file of the corpus has changed size or modification time."""
    files = dataset_files(corpus) if is_dataset_corpus(corpus) else corpus_files(corpus)
    stats = tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),))
    key = (corpus, stats)
    if key not in _HASHES:
        _HASHES[key] = _read_corpus(corpus)[0] if is_dataset_corpus(corpus) else _files_hash(files)[0]
    return _HASHES[key]


def _tokenize(content: list[bytes] | np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    if isinstance(content, np.ndarray):
        top = int(content.max(initial=0))
        return content.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)
    return tokenizer.encode_documents(content)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def load_tokens(data_cfg: DataConfig, *, cache: str | os.PathLike | None = None,
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """Tokenize the corpus of ``data_cfg`` and split it.

    Returns ``(train_tokens, valid_tokens, corpus_hash)``: 1-D ``uint8``/``uint16`` arrays and
    the 16-hex-digit SHA-256 prefix of the corpus files' content (before ``max_tokens``). Token arrays are cached under ``cache`` (default :func:`cache_dir`) as
    ``tokens-<hash>-<tokenizer>.npy``. Raises :class:`ConfigError` (one line) for a missing or
    unreadable corpus or one too small to hold a training and a validation window.
    """
    corpus_hash = corpus_content_hash(data_cfg.corpus)
    tok = tokenizer_for(data_cfg, cache=cache)
    path = Path(cache or cache_dir()) / f"tokens-{corpus_hash}-{tok.key}.npy"
    tokens = None
    if path.is_file():
        try:
            tokens = np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            tokens = None  # a damaged cache entry is rebuilt
    if tokens is None:
        corpus_hash, content = _read_corpus(data_cfg.corpus)
        path = Path(cache or cache_dir()) / f"tokens-{corpus_hash}-{tok.key}.npy"
        tokens = _tokenize(content, tok)
        try:
            _save_npy_atomic(path, tokens)
        except OSError:
            pass  # a read-only cache is not an error: the tokens are already in memory
    if data_cfg.max_tokens is not None:
        tokens = tokens[: data_cfg.max_tokens]
    n_valid = int(round(len(tokens) * data_cfg.valid_fraction))
    train, valid = tokens[: len(tokens) - n_valid], tokens[len(tokens) - n_valid:]
    need = data_cfg.seq_len + 1
    if len(train) < need or len(valid) < need:
        raise ConfigError(f"data.corpus = {data_cfg.corpus!r}: {len(tokens)} tokens leave "
                          f"{len(train)} train / {len(valid)} validation tokens, fewer than one "
                          f"window of seq_len + 1 = {need}; use a larger corpus, max_tokens or "
                          "valid_fraction, or a shorter seq_len")
    return train, valid, corpus_hash


def train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of ``step``: ``batch_size`` random windows of ``seq_len + 1`` tokens.

    Deterministic in ``(seed, step)`` alone, so resuming at ``step`` replays the same data.
    Returns ``(inputs, targets)``, each ``[batch_size, seq_len]`` int32.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                 n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed evaluation set: ``n_batches * batch_size`` windows at evenly spaced starts over
    the validation tokens (overlapping only when there are too few tokens), as batches of
    ``(inputs, targets)``."""
    n = n_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).round().astype(np.int64)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    windows = windows.reshape(n_batches, batch_size, seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
