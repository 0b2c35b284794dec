"""A saved model loaded for inference, as every command that runs one takes it (evaluate, caption,
serve, the index builder, prepare's similarity filter), and its inputs put where it runs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import InputNotFound


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "fp32"):
    """A saved model with its tokenizer, in eval mode, in ``dtype`` (fp32 | bf16 | int8); a clear
    error when either file is missing or the device cannot run the dtype."""
    from .models.coca import load
    from .precision import parse_precision
    model = load(model_dir, device=device, dtype=parse_precision(dtype))
    if model.tokenizer is None:
        raise InputNotFound(f"{Path(model_dir) / 'tokenizer.model'} is missing: evaluation needs the model's "
                                "tokenizer (save with model.save_pretrained(dir, tokenizer=tok))")
    return model


def to_model(model, images: torch.Tensor) -> torch.Tensor:
    """Images on the model's device and in its dtype (a bf16 model takes bf16 pixels)."""
    p = next(model.parameters())
    return images.to(p.device, p.dtype)
