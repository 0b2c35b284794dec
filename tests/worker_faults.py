"""Task functions that kill their own worker process, for the engine's retry tests (a module of
its own, so that spawned workers import nothing heavy to run them)."""

import os
import signal
from pathlib import Path


def die_once(x, marker_dir):
    """SIGKILLs its own process the first time it sees item 1: a worker killed mid-task."""
    marker = Path(marker_dir) / f"{x}.seen"
    if x == 1 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def always_die(x):
    if x == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
