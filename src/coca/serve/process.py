"""Starting `coca serve` as a child process and waiting until it answers (benchmarks, tests, scripts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(model_dir: str, *extra: str, env: dict | None = None, timeout: float = 60.0,
                 quiet: bool = False, python: str = sys.executable, cwd: str | None = None) -> tuple[subprocess.Popen, str]:
    """``coca serve --model DIR --port FREE *extra`` on loopback, run by ``python`` (another
    environment's interpreter to test an installed package); returns (process, base URL) once
    /health answers, or raises with the server's output if it exits or does not come up."""
    import httpx
    port = free_port()
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen([python, "-m", "coca.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             *map(str, extra)], env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coca serve exited with {proc.returncode}: "
                               + (proc.stdout.read().decode(errors="replace") if proc.stdout else ""))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"coca serve did not answer within {timeout:.0f} s")
