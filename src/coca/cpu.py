"""What this CPU's kernels can do, as PyTorch will use them: its bf16 matmul instructions, any
restriction of them in the environment, a compile cache kept apart per restriction, and one
thread count for results that must not depend on where they were computed."""

from __future__ import annotations

import os
import platform
import re
from contextlib import contextmanager
from pathlib import Path

# Environment variables that restrict the CPU kernels PyTorch uses (oneDNN, MKL, ATen's own).
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def _cpuinfo_value(key: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(cpuinfo).read_text().splitlines()
                     if line.startswith(key)), "")
    except OSError:
        return ""


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... ('' where /proc/cpuinfo says nothing)."""
    return _cpuinfo_value("vendor_id", cpuinfo)


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU model, its bf16 matmul instructions and any kernel restriction in the environment,
    e.g. ``AMD EPYC (avx512_bf16, no AMX)`` or ``... ONEDNN_MAX_CPU_ISA=AVX2``: how a timing is labelled."""
    flags = set(_cpuinfo_value("flags", cpuinfo).split())
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 instructions"]
    if "amx_bf16" not in flags:
        bf16.append("no AMX")
    limits = " ".join(f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k))
    return f"{_cpuinfo_value('model name', cpuinfo) or platform.machine()} ({', '.join(bf16)})" + (f" {limits}" if limits else "")


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below which its bf16 matmuls are emulated in fp32.
_ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_bf16_matmul(cpuinfo: str = "/proc/cpuinfo", env=None) -> bool:
    """Whether bf16 matmuls run in hardware here: the CPU has AMX-BF16 or AVX512-BF16 (read from
    /proc/cpuinfo) and ``ONEDNN_MAX_CPU_ISA`` does not restrict oneDNN to an ISA without them.
    Elsewhere bf16 matmuls are emulated and a BF16 step is several times slower than fp32
    (``benchmarks/demo_step.py`` under each ISA: docs/performance.md, "The demo")."""
    flags = set(_cpuinfo_value("flags", cpuinfo).split())
    limit = (os.environ if env is None else env).get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return bool({"amx_bf16", "avx512_bf16"} & flags) and limit not in _ONEDNN_BELOW_BF16


def isolate_inductor_cache(env=None) -> str | None:
    """Under an ISA restriction, point TorchInductor's cache at a directory of its own, before a
    ``torch.compile``. Inductor's cache key leaves ``ONEDNN_MAX_CPU_ISA`` out, while a frozen graph
    holds weights packed for oneDNN's ISA: a graph cached under ``ONEDNN_MAX_CPU_ISA=AVX2`` and
    loaded by an unrestricted process on the same machine aborts the process (seen with PyTorch
    2.14). Unrestricted processes keep the usual directory, which restricted ones never write.
    Returns the directory chosen, or None where nothing is restricted."""
    env = os.environ if env is None else env
    limits = [f"{k}-{env[k]}" for k in ISA_LIMITS if env.get(k)]
    if not limits:
        return None
    tag = "isa-" + re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(limits))
    base = env.get("TORCHINDUCTOR_CACHE_DIR")
    if base is None:
        from .compiled_decoding import private
        default_cache_dir = private("torch._inductor.runtime.cache_dir_utils", "default_cache_dir",
                                    "the restricted cache directory is put under the system's temporary directory",
                                    default=_default_cache_dir)
        base = default_cache_dir()
    if Path(base).name != tag:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base) / tag)
    return env["TORCHINDUCTOR_CACHE_DIR"]


def _default_cache_dir() -> str:
    """Where TorchInductor caches by default (``torch._inductor.runtime.cache_dir_utils``)."""
    import getpass
    import tempfile
    user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + user)


@contextmanager
def one_cpu_thread(device=None):
    """Run PyTorch's CPU kernels on one thread inside the block (unless ``device`` is not the CPU).

    The CPU's matmul kernels split their sums by thread count, so the same model on the same
    inputs rounds differently with 1 or N threads. Data preparation computes embeddings in this
    process, in local worker processes or in Ray tasks (which Ray gives one CPU each); one thread
    everywhere keeps their outputs bit for bit the same. Its tasks run one per core in parallel."""
    import torch
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
