"""Scaled dot-product attention in one place for both towers, and the dtype it runs in.

On CPU, attention that will be back-propagated runs in fp32 when its inputs are bf16, under
autocast (bf16 projections over fp32 weights) and with bf16 weights (DeepSpeed BF16) alike, so
both engines compute the same thing: the CPU flash-attention kernel's bf16 backward is several
times slower than its fp32 one, which made a BF16 training step slower than fp32 on CPUs whose
bf16 matmuls are 4x faster (AMX). Inference, GPUs and fp32 inputs run attention in the inputs'
dtype (under autocast on a GPU, the autocast dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention (and its additive bias) runs in for activations like ``x``."""
    dev = x.device.type
    autocast = dev != "meta" and torch.is_autocast_enabled(dev)
    if dev == "cpu" and (autocast or (x.dtype == torch.bfloat16 and x.requires_grad and torch.is_grad_enabled())):
        return torch.float32
    return torch.get_autocast_dtype(dev) if autocast else x.dtype


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
              scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` in ``compute_dtype(q)``; ``bias`` is an additive mask."""
    dtype = compute_dtype(q)
    mask = None if bias is None else bias.to(dtype)
    if q.dtype == dtype:
        if compiled_cpu_decoding(q, dropout_p):
            return single_query_attention(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    with torch.autocast(q.device.type, enabled=False):  # bf16 in, fp32 attention, bf16 out
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                             dropout_p=dropout_p, scale=scale)
    return out.to(q.dtype)


def compiled_cpu_decoding(q: Tensor, dropout_p: float) -> bool:
    """One query position without gradients or dropout, traced by ``torch.compile`` on CPU: the
    compiled decoding step (training keeps SDPA and its backward)."""
    return (q.shape[-2] == 1 and dropout_p == 0.0 and q.device.type == "cpu" and not torch.is_grad_enabled()
            and torch.compiler.is_compiling())


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """Attention written out for a single query, for inductor to fuse: on CPU its kernels read the
    keys and values faster than the flash-attention kernel does at one query
    (``benchmarks/decode_step.py`` times the compiled step with each)."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v
