"""Atomic file writes (a reader sees the old file or the new one, never half of one) and JSON.

Every file the package writes (configs, fits, tables, figures, token caches) goes through
:func:`atomic_path`: the content is written to a temporary file in the destination folder, given
a normal file mode, and renamed over the destination (``os.replace`` is atomic on POSIX).

JSON goes through :func:`json_default` (numpy and JAX scalars and arrays become Python numbers and
lists) and, for files, :func:`write_json`. :func:`finite_or_none` makes a value strict JSON
(non-finite floats become ``null``) where a reader in another language must parse it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "json_default", "write_json",
           "finite_or_none"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy/JAX scalars -> numbers, arrays -> lists."""
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (numpy values converted by :func:`json_default`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (nan, inf) replaced by None, recursively through dicts,
    lists and tuples: strict JSON."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory ``fcntl`` lock on the file ``path`` (created if missing), held for the
    ``with`` block and released on exit or when the process dies."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
