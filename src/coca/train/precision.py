"""Where a run trains and in what precision: ``train.device``/``train.precision`` resolved, and the
attention implementation that goes with BF16 on this device."""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..cpu import cpu_has_bf16_matmul
from ..models.attention import SDPA, SDPA_FP32, AttentionImpl


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it, and on a CPU with native bf16 matmuls (AMX or
    AVX512-BF16, not restricted below them by ONEDNN_MAX_CPU_ISA); fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_matmul() else "fp32"


def training_attention(device: torch.device, precision: str) -> AttentionImpl:
    """BF16 training on CPU runs attention in fp32 over its bf16 inputs, under autocast (single,
    DDP) and with bf16 weights (DeepSpeed) alike, so every engine computes the same thing: the CPU
    flash-attention kernel's bf16 backward is several times slower than its fp32 one, which made a
    BF16 step slower than fp32 on CPUs whose bf16 matmuls are 4x faster (AMX). GPUs and fp32 runs
    compute attention in the inputs' dtype."""
    return SDPA_FP32 if device.type == "cpu" and precision == "bf16" else SDPA
