"""Parameter counts by component and forward FLOPs measured with ``torch.utils.flop_counter``.

Both work on a model built on the meta device, so the 1.1B-parameter preset costs no memory.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .components import COMPONENTS, VISUAL_COMPONENTS, component_of  # noqa: F401 (re-exported)
from .models.coca import CoCa


def parameter_counts(model: CoCa) -> dict[str, int]:
    counts = {c: 0 for c in COMPONENTS}
    for name, p in model.named_parameters():  # shared parameters are listed once
        counts[component_of(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def branch_totals(counts: dict[str, int]) -> tuple[int, int]:
    """(visual branch, language branch); projections and temperature are split evenly."""
    visual = sum(counts[c] for c in VISUAL_COMPONENTS) + (counts["projections"] + counts["temperature"]) // 2
    return visual, counts["total"] - visual


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention dispatches to here (and on the meta device): without this, every
# attention's QK^T and AV were left out of the count.
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)


def forward_flops(model: CoCa, batch: int = 1, text_tokens: float | None = None,
                  patch_dropout: float = 0.0) -> dict[str, float]:
    """FLOPs of one ``model(images, tokens)`` call, per component and total.

    ``text_tokens``: the real tokens per caption that the packed text towers compute (a mean may be
    fractional: the FLOPs are interpolated between the two whole lengths around it, exact for the
    linear layers, which are all but ~2% at these lengths); None is the full context, padded.
    ``patch_dropout``: the share of patch tokens the vision tower drops (training's FLIP masking)."""
    if text_tokens is None:
        return _forward_flops(model, batch, model.cfg.text.context_length, patch_dropout)
    if not 1 <= text_tokens <= model.cfg.text.context_length:
        raise ValueError(f"text_tokens must be in [1, {model.cfg.text.context_length}], got {text_tokens}")
    low = int(text_tokens)
    below = _forward_flops(model, batch, low, patch_dropout)
    if low == text_tokens:
        return below
    above, w = _forward_flops(model, batch, low + 1, patch_dropout), text_tokens - low
    return {k: (1 - w) * below[k] + w * above[k] for k in below}


def _forward_flops(model: CoCa, batch: int, text_len: int, patch_dropout: float) -> dict[str, float]:
    cfg = model.cfg
    device = next(model.parameters()).device
    images = torch.zeros(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    tokens = torch.ones(batch, text_len, dtype=torch.long, device=device)  # every token real: one caption's packed cost
    with torch.no_grad(), flop_counter() as counter:
        model(images, tokens, patch_dropout=patch_dropout)
    per_module = counter.get_flop_counts()
    name = type(model).__name__
    out = {}
    # the open_clip family's text tower is also its decoder's lower half (``text_decoder.text``), the
    # name the counter may file it under when the model runs it for the text embedding
    for label, module in (("visual", "visual"), ("poolers", "gen_pooler"), ("poolers", "contrastive_pooler"),
                          ("text_encoder", "text_encoder"), ("text_encoder", "text_decoder.text"),
                          ("text_decoder", "text_decoder")):
        out[label] = out.get(label, 0) + sum(per_module.get(f"{name}.{module}", {}).values())
    out["total"] = sum(per_module.get("Global", {}).values())
    return out
