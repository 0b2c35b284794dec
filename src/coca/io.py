"""Atomic file writes: a reader never sees a half-written checkpoint, config or report."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import DiskFull

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException, path) -> DiskFull | None:
    """A one-line error naming ``path`` when ``error`` is a full disk (or quota), else None."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return DiskFull(f"no space left on the device writing {path}")
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = disk_full(e, path)
        if full is not None:
            raise full from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform/filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_dir(tmp: Path, final: Path) -> None:
    """Make a fully written temporary directory ``final``, durably: every file fsynced, one
    rename, the parent fsynced. A task whose output is such a directory is done exactly when it
    exists."""
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(Path(final).parent)
