"""The compiled decoding step: ``T5Decoder.static_step`` under ``torch.compile``, in an object that
its caller owns (a caption run, an evaluation, a server), and the CPU kernels it runs with.

``CompiledDecoder(model)`` compiles one graph per row count, length and dtype, with the weights
frozen into it (on CPU the Linear layers then use prepacked GEMM weights). Dynamo keeps compiled
graphs on the code object of the function it compiles, so each ``CompiledDecoder`` compiles its own
copy of the step function's code: its graphs are its own, and dropping them (``forget``, a weight
change, the object's end) drops nothing else. ``torch.compiler.reset()`` is never called: it would
also drop the graphs of any other compiled model in the process, e.g. a training model that is
evaluated while it trains, which would then compile again at its next step.

Two kernel choices make the compiled CPU step faster (``benchmarks/decode_step.py``; the model
code has no such branches): attention for the one new position is written out for inductor to
fuse (``SINGLE_QUERY``), and at two rows on Intel CPUs the Linear layers run as a batched matmul
(``TwoRowLinearAsBatchedMatmul``; slower on AMD, ``TWO_ROW_LINEAR_HELPS``).

Frozen weights are copies taken at compile time, so a weight change must rebuild the graphs: each
decoding call compares the decoder's weights signature (storage and version counter of every
parameter and buffer) with the one compiled, and recompiles its own copy when they differ. A write
through ``.data`` is not counted by PyTorch, nor is fused AdamW's step, so the signature also holds
a few sampled values of each weight; ``forget()`` drops the graphs by hand (after a write through
``.data`` to a part of a weight).

The private inductor and dynamo settings used here (weight freezing, the number of graphs kept, the
exceptions of a failed compile, dropping one function's graphs) are read through ``private`` and
``compile_settings``, which check that this PyTorch has them and fall back with a warning.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .cpu import cpu_vendor, isolate_inductor_cache
from .errors import UserError
from .models.attention import AttentionImpl

# (config module, setting, value, what is lost without it) entered while a new shape compiles.
# Freezing is scoped to the step: set globally it would also freeze the weights of a training
# model compiled elsewhere in the process and evaluated under no_grad.
COMPILE_SETTINGS = (
    ("torch._inductor.config", "freezing", True, "weights are not frozen into the graph (a slower step)"),
    ("torch._dynamo.config", "recompile_limit", 64, "fewer shape buckets keep a compiled graph"),
)
# inductor and dynamo settings are process-wide: one compile of a decoding step at a time
_COMPILE_LOCK = threading.RLock()
_WARNED: set[str] = set()
_MISSING = object()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def private(module: str, name: str, lost: str, default=None):
    """``module.name`` from PyTorch's private API, or ``default`` (with a warning, once, saying what
    is ``lost``) where this PyTorch has no such module or attribute."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        _warn_once(f"{module}.{name}", f"this PyTorch ({torch.__version__}) has no {module}.{name}: {lost}")
        return default


@contextlib.contextmanager
def compile_settings():
    """The inductor and dynamo settings the decoding step compiles under (``COMPILE_SETTINGS``);
    one this PyTorch lacks is skipped with a warning, and the step compiles without it."""
    with contextlib.ExitStack() as stack:
        for module, key, value, lost in COMPILE_SETTINGS:
            if private(module, key, lost, default=_MISSING) is not _MISSING:
                stack.enter_context(importlib.import_module(module).patch({key: value}))
        yield


class _NeverRaised(Exception):
    """Stands in for a dynamo exception this PyTorch does not define."""


def _dynamo_exception(name: str, lost: str) -> type[BaseException]:
    return private("torch._dynamo.exc", name, lost, default=_NeverRaised)


SAMPLED = 16  # elements of each weight, evenly spaced, whose values the signature holds


def weights_signature(module) -> tuple[tuple, Tensor]:
    """What changes when a weight is replaced or updated: each tensor's storage and version counter
    (which counts writes through the tensor, not through ``.data``), and the values of ``SAMPLED``
    of its elements, for the updates the counter misses (fused AdamW's step does not count; nor
    does an EMA through ``.data``). A few elements per weight, not a checksum of all: it is taken at
    every decoding call, and an update of the whole tensor moves them all."""
    tensors = [*module.parameters(), *module.buffers()]
    counted = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)
    with torch.no_grad():
        values = torch.cat([t.detach().reshape(-1)[::max(1, t.numel() // SAMPLED)][:SAMPLED].float() for t in tensors])
    return counted, values


def _same_weights(a: tuple[tuple, Tensor] | None, b: tuple[tuple, Tensor]) -> bool:
    return a is not None and a[0] == b[0] and torch.equal(a[1], b[1])


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0,
                           scale: float | None = None) -> Tensor:
    """Attention written out for a single query without dropout, for inductor to fuse: on CPU its
    kernels read the keys and values faster than the flash-attention kernel does at one query
    (``benchmarks/decode_step.py`` times the compiled step with each)."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


SINGLE_QUERY = AttentionImpl("single_query", single_query_attention)


class TwoRowLinearAsBatchedMatmul(TorchFunctionMode):
    """Entered by the compiled CPU step at two rows: an fp32 Linear without bias runs as a batched
    matmul of one batch. Inductor turns a frozen Linear into MKL's packed GEMM, which at two rows
    streams the weights more slowly than the plain GEMM a batched matmul calls, so slowly that the
    step took longer at two rows than at four (``benchmarks/decode_step.py``). At one row and at
    four or more the packed GEMM is the faster, so they keep it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if func is F.linear and bias is None:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if weight.dtype == torch.float32 and x.shape[:-1].numel() == 2:
                out = torch.bmm(x.reshape(1, 2, x.shape[-1]), weight.t().unsqueeze(0))
                return out.reshape(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


# dynamo traces a TorchFunctionMode entered inside a compiled region from PyTorch 2.6 on; before,
# it is a graph break, which the step's fullgraph compile would turn into an error
MODES_TRACEABLE = torch.__version__ >= (2, 6)
# The two-row batched matmul is a fix for MKL's packed GEMM on Intel: the step at two rows 1.16x
# faster with it there, and 1.56x slower with it on an AMD EPYC, where the packed GEMM is the
# faster at two rows too (benchmarks/decode_step.py, --two-row forces the mode on)
TWO_ROW_LINEAR_HELPS = cpu_vendor() == "GenuineIntel"


def _traced_step(decoder, tokens, position, keys, values, cross, bias_table, cpu_kernels=True):
    """What a ``CompiledDecoder`` compiles (a copy of this function's code per object): the step,
    on CPU with ``SINGLE_QUERY`` attention and, at two rows on Intel, ``TwoRowLinearAsBatchedMatmul``
    (``cpu_kernels=False``: the model's own kernels, as ``benchmarks/decode_step.py`` compares)."""
    on_cpu = cpu_kernels and tokens.device.type == "cpu"
    two_rows = on_cpu and tokens.shape[0] == 2 and MODES_TRACEABLE and TWO_ROW_LINEAR_HELPS
    with TwoRowLinearAsBatchedMatmul() if two_rows else contextlib.nullcontext():
        return decoder.static_step(tokens, position, keys, values, cross, bias_table,
                                   impl=SINGLE_QUERY if on_cpu else None)


def _own_copy(fn, defaults: tuple):
    """``fn`` with a code object of its own, on which dynamo keeps this copy's graphs apart, and
    ``defaults`` for its trailing arguments."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, defaults, fn.__closure__)


class CompiledDecoder:
    """The compiled fixed-shape decoding step of one decoder (``model.text_decoder`` or the decoder
    itself), for ``generate(..., compiled=...)``. Its graphs are built on first use, kept for the
    object's life and rebuilt when the decoder's weights change; see the module docstring.
    ``cpu_kernels=False`` compiles the model's own attention and Linear layers (for comparison)."""

    def __init__(self, model, cpu_kernels: bool = True):
        self.decoder = getattr(model, "text_decoder", model)
        self.cpu_kernels = cpu_kernels
        self._compiled = None       # torch.compile of this object's copy of the step
        self._code = None           # that copy's code object, which holds its graphs
        self._signature = None      # the weights the graphs were compiled with
        self._shapes: set = set()   # shapes compiled: only a new one enters the compile settings
        self.compiles = 0           # how many times the graphs were (re)built

    def step(self):
        """The compiled step ``fn(tokens, position, keys, values, cross, bias_table) -> logits``,
        rebuilt first if the decoder's weights changed since it was compiled."""
        with _COMPILE_LOCK:
            signature = weights_signature(self.decoder)
            if self._compiled is None or not _same_weights(self._signature, signature):
                self.forget()  # frozen weights are stale: the graphs would serve them again
                isolate_inductor_cache()
                fn = _own_copy(_traced_step, (self.cpu_kernels,))
                self._code = fn.__code__
                self._compiled = torch.compile(types.MethodType(fn, self.decoder), fullgraph=True, dynamic=False)
                self._signature = signature
                self.compiles += 1
            return self._run

    def forget(self) -> None:
        """Drop this object's graphs (and the weights frozen into them); the next ``step`` compiles
        again. Needed by hand only after a part of a weight was changed through ``.data``."""
        with _COMPILE_LOCK:
            self._release()
            self._compiled = self._signature = None
            self._shapes = set()

    def _release(self, quiet: bool = False) -> None:
        # the graphs are held by the code object's cache in a cycle the garbage collector does not
        # see, so they are dropped explicitly, for this code object only
        if self._code is not None:
            reset_code = (getattr(sys.modules.get("torch._dynamo"), "reset_code", None) if quiet else
                          private("torch._dynamo", "reset_code", "replaced compiled graphs stay in memory"))
            if reset_code is not None:
                reset_code(self._code)
            self._code = None

    def __del__(self):
        try:
            self._release(quiet=True)
        except Exception:  # at interpreter exit torch may be gone already
            pass

    def _run(self, *args):
        tokens, bias_table = args[0], args[-1]
        shape = (tokens.shape[0], bias_table.shape[0], bias_table.dtype, bias_table.device)
        with _COMPILE_LOCK, contextlib.ExitStack() as settings:
            # the settings are read only while compiling, so only a call with a new shape enters
            # them (they cost tens of µs a step otherwise)
            if shape not in self._shapes:
                settings.enter_context(compile_settings())
            try:
                out = self._compiled(*args)
                self._shapes.add(shape)
                return out
            except _dynamo_exception("FailOnRecompileLimitHit", "a shape past the graph limit fails"):
                # more shape buckets than graphs allowed (a long-lived server): this shape runs
                # the same step uncompiled, which gives the same tokens
                return self.decoder.static_step(*args)
            except _dynamo_exception("BackendCompilerFailed", "a failed compile is not told apart") as e:  # e.g. no working C++ compiler on CPU
                reason = str(e).strip().splitlines()[0]
                raise UserError(f"compile=True could not compile the decoding step ({reason}); "
                                "decode without it (compile=False, or drop --compile)") from e
