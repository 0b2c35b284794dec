"""Scaled dot-product attention in one place for both towers, in an implementation its caller picks.

An ``AttentionImpl`` names a kernel and the dtype it computes in. Every attention module starts
with ``SDPA`` (``F.scaled_dot_product_attention`` in the inputs' dtype, the autocast dtype under
autocast); whoever sets up a run chooses another with ``set_attention(model, impl)``: the training
engines take ``coca.precision.training_attention`` (fp32 attention for BF16 training on CPU), and
compiled decoding passes its own kernel to ``T5Decoder.static_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (q, k, v, additive mask or None, dropout_p, scale or None) -> attention output
AttentionKernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, "float | None"], Tensor]


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


@dataclass(frozen=True)
class AttentionImpl:
    name: str
    kernel: AttentionKernel
    dtype: torch.dtype | None = None  # what it computes in; None: the inputs' dtype

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype attention (and the additive bias its caller builds) runs in for activations like ``x``."""
        if self.dtype is not None:
            return self.dtype
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if dev != "meta" and torch.is_autocast_enabled(dev) else x.dtype


SDPA = AttentionImpl("sdpa", sdpa)
# BF16 training on CPU: the CPU flash-attention kernel's bf16 backward is several times slower than
# its fp32 one, which made a BF16 step slower than fp32 on CPUs whose bf16 matmuls are 4x faster (AMX)
SDPA_FP32 = AttentionImpl("sdpa_fp32", sdpa, torch.float32)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
              scale: float | None = None, impl: AttentionImpl = SDPA) -> Tensor:
    """``impl``'s kernel in ``impl.compute_dtype(q)``, output in q's dtype; ``bias`` is an additive mask.
    q: [B, H, L, Dh]; k, v: [B, H, S, Dh]; bias: [B|1, H|1, L, S]."""
    dtype = impl.compute_dtype(q)
    mask = None if bias is None else bias.to(dtype)
    if q.dtype == dtype:
        return impl.kernel(q, k, v, mask, dropout_p, scale)
    with torch.autocast(q.device.type, enabled=False):  # e.g. bf16 in, fp32 attention, bf16 out
        out = impl.kernel(q.to(dtype), k.to(dtype), v.to(dtype), mask, dropout_p, scale)
    return out.to(q.dtype)


_compiled_flex: dict = {}


def document_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, score_mod=None, scale: float | None = None,
                       impl: AttentionImpl = SDPA) -> Tensor:
    """FlexAttention over packed sequences (``TextPacking`` with ``kernel="flex"``): q [1, H, T, Dh],
    k, v [1, H, S, Dh]; ``block_mask`` says which keys each query sees (its own caption, or its own
    image's visual tokens), ``score_mod`` adds the position bias. Computes in
    ``impl.compute_dtype(q)``, output in q's dtype. On GPUs the kernel is compiled once, with
    dynamic shapes (every batch packs to another length); on CPUs it runs uncompiled, forward only."""
    from torch.nn.attention.flex_attention import flex_attention
    kernel = flex_attention
    if q.device.type == "cuda":
        kernel = _compiled_flex.setdefault("cuda", torch.compile(flex_attention, dynamic=True))
    dtype = impl.compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        out = kernel(q.to(dtype), k.to(dtype), v.to(dtype), score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.to(q.dtype)


def set_attention(model: nn.Module, impl: AttentionImpl) -> None:
    """Every attention module of ``model`` computes with ``impl`` from now on."""
    for module in model.modules():
        if hasattr(module, "attention_impl"):
            module.attention_impl = impl
