"""Inference precision: ``fp32``, ``bf16`` weights, or ``int8`` dynamic quantisation (CPU).

``int8`` is dynamic quantisation of every Linear layer (``Int8Linear``): int8 weights with one
scale per output channel, and at every call each input row quantised to int8 with its own scale,
multiplied with ``torch._int_mm`` (exact int32 accumulation, AMX/VNNI kernels on x86; on a CPU
whose int8 kernel is not exact, see ``int_mm_is_exact``, the same integers in fp32). Norms,
embeddings, the patch convolution and attention itself stay fp32. It targets CPU decoding, which
at small batches is bound by reading the decoder and LM-head weights: int8 reads a quarter of the
bytes. Because each row is quantised on its own, a caption does not depend on the other images in
its batch and the KV cache stays exact. (PyTorch's ``quantize_dynamic`` and torchao's eager int8
config were measured too: the first quantises activations per tensor, so results change with the
batch and with caching; the second was no faster than fp32 here.) On CUDA use bf16: int8 is
refused there.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

PRECISIONS = ("fp32", "bf16", "int8")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8"}


def parse_precision(value) -> str:
    """'fp32' | 'bf16' | 'int8' from a name or a torch dtype; anything else is a clear error."""
    if isinstance(value, torch.dtype):
        value = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(value, str(value))
    name = _ALIASES.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise UserError(f"dtype must be one of {PRECISIONS}, got {value!r}")
    return name


def apply_precision(model: nn.Module, precision, device: str | torch.device | None = None) -> nn.Module:
    """Convert ``model`` (already on ``device``) in place to the given inference precision."""
    precision = parse_precision(precision)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"dtype bf16 is not supported by this GPU ({torch.cuda.get_device_name(device)}); "
                            "use --dtype fp32")
        model.to(torch.bfloat16)
    elif precision == "int8":
        if device.type != "cpu":
            raise UserError(f"dtype int8 (dynamic quantisation) runs on CPU only, not on {device.type}; "
                            "use --dtype bf16 on a GPU")
        quantize_linear_int8(model)
    model.precision = precision
    return model


_INT_MM_EXACT: bool | None = None


def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` multiplies int8 exactly here, probed once per process on a seeded
    random product laid out as ``Int8Linear`` calls it. oneDNN's int8 x int8 kernels without VNNI
    (a CPU with AVX2 only, or any CPU under ``ONEDNN_MAX_CPU_ISA=AVX2`` or ``AVX512_CORE``) return
    wrong sums: off by up to 1e6 on a 64-deep product of values up to 127 (PyTorch 2.14)."""
    global _INT_MM_EXACT
    if _INT_MM_EXACT is None:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (17, 64), generator=g).to(torch.int8)
        b = torch.randint(-127, 128, (48, 64), generator=g).to(torch.int8)
        _INT_MM_EXACT = torch.equal(torch._int_mm(a, b.t()).long(), a.long() @ b.long().t())
    return _INT_MM_EXACT


class Int8Linear(nn.Module):
    """y = (q(x) @ W_q^T) * s_x * s_w + b: W_q int8 per output channel, x quantised per row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        x_scale = rows.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        x_int8 = (rows / x_scale).round().clamp(-127, 127).to(torch.int8)
        if int_mm_is_exact():
            # the transposed view is what the CPU kernel reads fastest (measured: 158 vs 219 us at one row)
            products = torch._int_mm(x_int8, self.weight_int8.t()).float()
        else:  # the same integer products in fp32: exact while a sum stays under 2^24 (1,040 terms of 127 x 127)
            products = x_int8.float() @ self._weight_fp32().t()
        out = products * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _weight_fp32(self) -> torch.Tensor:
        """The int8 weights as fp32, kept for CPUs without an exact int8 kernel; made again when
        the weights change (a load_state_dict copies into the same tensor and bumps its version)."""
        key = (self.weight_int8.data_ptr(), self.weight_int8._version)
        cached = self.__dict__.get("_fp32_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.weight_int8.float())
            self.__dict__["_fp32_cache"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row dynamic"


def quantize_linear_int8(model: nn.Module) -> None:
    """Replace every nn.Linear of ``model`` by an ``Int8Linear`` (in place)."""
    try:
        torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (RuntimeError, AttributeError) as e:
        raise UserError(f"dtype int8 needs torch._int_mm on CPU, which this PyTorch lacks ({e}); use --dtype bf16") from None
    if not int_mm_is_exact():
        import warnings
        warnings.warn("this CPU's int8 matmul kernel is not exact (no VNNI, or ONEDNN_MAX_CPU_ISA below it): "
                      "int8 layers multiply their integers in fp32 here, correct but no faster than fp32", stacklevel=2)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
