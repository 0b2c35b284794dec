"""Progress bars that suit where they are written.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a CI log, ``make demo > log 2>&1``,
a cluster job's output file) a bar redrawn with carriage returns becomes one enormous line of
frames, so there the bar writes a plain line at most every ``COCA_PROGRESS_INTERVAL`` seconds
(default 30) and one last line when it closes.
"""

from __future__ import annotations

import os
import sys
import time

DEFAULT_INTERVAL_S = 30.0


def line_interval() -> float:
    """Seconds between two progress lines off a terminal (``COCA_PROGRESS_INTERVAL``)."""
    value = os.environ.get("COCA_PROGRESS_INTERVAL", "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class LineProgress:
    """The part of tqdm's interface the project uses, written as whole lines at an interval."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
                 file=None, interval: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc or "progress", unit, initial
        self.file = file if file is not None else sys.stderr
        self.interval = line_interval() if interval is None else interval
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.start_n = initial
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self._write(now)

    def set_postfix(self, values: dict | None = None, refresh: bool = False, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(values or {}), **kwargs}.items())

    def _write(self, now: float) -> None:
        self.last_line = now
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total}" if self.total else f"{self.desc}: {self.n}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_fmt_seconds(elapsed)} elapsed, {rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_fmt_seconds((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        try:
            print(", ".join(parts), file=self.file, flush=True)
        except (OSError, ValueError):  # a closed or broken log stream must not stop the job
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0, leave: bool = True,
                 file=None):
    """tqdm on a terminal, ``LineProgress`` elsewhere; both are context managers with ``update``,
    ``set_postfix`` and ``close``."""
    stream = file if file is not None else sys.stderr
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        return LineProgress(total, desc, unit, initial, stream)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True, file=stream)
