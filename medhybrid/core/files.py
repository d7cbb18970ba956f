"""Files written so that a crash or a kill loses nothing (:func:`atomic_write`, :func:`write_json`), a file's content
hash (:func:`sha256`), and the errors that stop a whole command (:func:`disk_full`, :class:`DiskFull`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _in_chain(exc: BaseException, wanted) -> BaseException | None:
    """The first exception in ``exc``'s chain (itself, then its causes and contexts) for which ``wanted`` holds."""
    seen: BaseException | None = exc
    while seen is not None:
        if wanted(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space error (``ENOSPC``) behind ``exc``: itself or one in its chain of causes; None when there is
    none. A full disk stops a whole command (an ablation does not go on to its next run)."""
    return _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno == errno.ENOSPC)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` atomically: the body writes the yielded temporary path (in the same folder, ending in the same
    name, so writers that pick a format by suffix still do), which then replaces ``path`` in one step. A reader, or a
    run killed mid-write, sees the old file or the new one, never half of one. Parent folders are created; on an
    error the temporary file (or folder) is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, allow_nan: bool = True) -> Path:
    """Write ``data`` as JSON atomically (:func:`atomic_write`). ``allow_nan=False`` for strict JSON (NaN raises)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, allow_nan=allow_nan))
    return Path(path)



class DiskFull(OSError):
    """A checkpoint write that ran out of disk space; the previous checkpoint is intact."""

