"""Corpora kept as Hugging Face ``datasets`` (the ``datasets`` extra: ``pip install -e ".[datasets]"``).

``DataConfig.corpus`` may name:

* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (its ``train`` split);
* a local ``.parquet`` or ``.arrow`` file;
* ``hf:NAME[:SPLIT][:COLUMN]``: ``datasets.load_dataset(NAME, split=SPLIT)`` (default split ``train``),
  from the Hub or the local ``datasets`` cache; offline or unknown, one line saying it could not be
  reached.

Each row is one document (joined with EOS like the files of a folder). The text column is
``COLUMN``, else ``text``, else the only string column; anything else is one line naming the
columns. The corpus hash covers the documents' bytes in order, so the token cache keys on the
content, as for files.
"""

from __future__ import annotations

from pathlib import Path

from moe_scaling.errors import ConfigError

__all__ = ["HF_PREFIX", "is_dataset_corpus", "dataset_files", "dataset_documents"]

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_dataset_corpus(corpus: str) -> bool:
    """Whether ``corpus`` is read through ``datasets`` (not as text files)."""
    if corpus.startswith(HF_PREFIX):
        return True
    path = Path(corpus).expanduser()
    if path.is_file():
        return path.suffix in TABLE_SUFFIXES
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS)


def dataset_files(corpus: str) -> list[Path]:
    """The local files a dataset corpus is read from (empty for ``hf:``): what a change of the
    corpus would touch, for the in-process hash cache."""
    if corpus.startswith(HF_PREFIX):
        return []
    path = Path(corpus).expanduser()
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _parse_hf(corpus: str) -> tuple[str, str, str | None]:
    parts = corpus[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise ConfigError(f"data.corpus = {corpus!r}: write hf:NAME[:SPLIT][:COLUMN], e.g. "
                          "hf:roneneldan/TinyStories:validation:text")
    return parts[0], parts[1] if len(parts) > 1 else "train", parts[2] if len(parts) > 2 else None


def _require_datasets(corpus: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.corpus = {corpus!r}: a Hugging Face dataset needs the datasets extra: "
                          "pip install -e '.[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _load(corpus: str):
    """The ``datasets.Dataset`` and the column asked for (None: choose)."""
    datasets = _require_datasets(corpus)
    if corpus.startswith(HF_PREFIX):
        name, split, column = _parse_hf(corpus)
        try:
            return datasets.load_dataset(name, split=split), column
        except (ConnectionError, OSError) as err:     # offline, unknown name: the Hub was not reached
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"data.corpus = {corpus!r}: could not be reached ({first}); check the name and "
                              "the network, or use a local copy (Dataset.save_to_disk, parquet)") from None
        except ValueError as err:                     # e.g. an unknown split
            raise ConfigError(f"data.corpus = {corpus!r}: {str(err).splitlines()[0]}") from None
    path = Path(corpus).expanduser()
    try:
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path)), None
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path)), None
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - pyarrow and datasets raise many types for a bad file
        raise ConfigError(f"data.corpus = {corpus!r}: not a readable dataset ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); write it with "
                          "Dataset.save_to_disk or to_parquet") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data.corpus = {corpus!r}: a DatasetDict without a 'train' split (it has "
                              f"{', '.join(ds)}); save the split to use on its own")
        ds = ds["train"]
    return ds, None


def dataset_documents(corpus: str) -> list[bytes]:
    """The UTF-8 documents (one per row, in order) of a dataset corpus."""
    ds, column = _load(corpus)
    strings = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if column is None:
        column = "text" if "text" in strings else strings[0] if len(strings) == 1 else None
    if column is None or column not in strings:
        raise ConfigError(f"data.corpus = {corpus!r}: " + (f"no string column {column!r}" if column else
                          "no 'text' column and not exactly one string column")
                          + f" (string columns: {', '.join(strings) or 'none'}); name it: hf:NAME:SPLIT:COLUMN")
    return [str(t).encode("utf-8") for t in ds[column] if t is not None]
