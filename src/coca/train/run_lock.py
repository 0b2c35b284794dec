"""One training process (or one launch: rank 0 for all ranks) per run directory.

An exclusive ``flock`` on ``RUN_DIR/train.lock``, taken before the run writes anything, with the
holder's host, pid and start time written in the file so that a second ``coca train`` on the same
directory can say who has it. The kernel drops the lock when its process ends, however it ends,
so a run killed with SIGKILL never blocks its own resume; the file's stale text is then only
overwritten. ``flock`` is local to a machine (and unreliable on some network filesystems): two
hosts sharing a run directory are not guarded against each other.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

LOCK_FILE = "train.lock"


class RunDirectoryInUse(UserError):
    """Another process is training in this run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None when taken, else the holder as its file names it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def in_use_error(run_dir: Path, holder: str) -> RunDirectoryInUse:
    return RunDirectoryInUse(f"train.run_dir {str(run_dir)!r} is in use: {holder} is training in it "
                             f"({Path(run_dir) / LOCK_FILE}); wait for it to finish or stop it, or choose another "
                             "train.run_dir")
