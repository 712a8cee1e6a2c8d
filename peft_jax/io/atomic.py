"""Atomic writes: a directory or a file appears whole, or not at all, and never replaces a good
one with a partial one.

A directory is written into a hidden temporary sibling, flushed to disk, then renamed into place.
If the target already exists it is first renamed aside and removed only once the new one is in
place, so a crash at any moment leaves either the old or the new version (possibly under its
aside name), never a mix.

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "adapter") as tmp:
    ...     _ = (tmp / "weights.bin").write_bytes(b"abc")
    >>> sorted(p.name for p in root.iterdir())
    ['adapter']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "write_json_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_modes(directory: Path) -> None:
    """Gives the temporary tree the modes ordinary files get (tempfile makes them private)."""
    mask = _umask()
    for path in [*directory.rglob("*"), directory]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory that replaces ``target`` when the block succeeds.

    On an exception inside the block the temporary directory is removed and ``target`` is left
    exactly as it was.

    Args:
        target: the directory to create or replace.

    Yields:
        The temporary directory to fill (a sibling of ``target``, on the same filesystem).

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_directory(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (target / "a.txt").read_text()
        'hi'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        _fsync_tree(tmp)
        aside = None
        if target.exists():
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
            os.replace(target, aside)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file and a rename: readers see the old
    file or the new one, never a part.

    Example:
        >>> import pathlib, tempfile
        >>> write_text_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hi").read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Writes ``obj`` as JSON to ``path`` atomically (`write_text_atomic`).

    Example:
        >>> import pathlib, tempfile, json
        >>> p = write_json_atomic(pathlib.Path(tempfile.mkdtemp()) / "r.json", {"a": 1})
        >>> json.loads(p.read_text())
        {'a': 1}
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
