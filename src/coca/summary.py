"""Parameter counts by component and forward FLOPs measured with ``torch.utils.flop_counter``.

Both work on a model built on the meta device, so the 1.1B-parameter preset costs no memory.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models.coca import CoCa

# component -> parameter-name prefixes (the shared token embedding counts once, under "embeddings")
COMPONENTS = {
    "vision tower (ViT)": ("visual.",),
    "attentional poolers": ("gen_pooler.", "contrastive_pooler.", "ln_visual."),
    "text encoder (T5)": ("text_encoder.",),
    "text decoder (T5)": ("text_decoder.",),
    "token embedding (shared)": ("text_encoder.embed_tokens.",),
    "LM head (untied)": ("text_decoder.lm_head.",),
    "projections + temperature": ("image_proj.", "text_proj.", "logit_scale"),
}
VISUAL_COMPONENTS = ("vision tower (ViT)", "attentional poolers")


def _component(name: str) -> str:
    # most specific prefix wins (the embedding and LM head sit inside the text modules)
    best, best_len = None, -1
    for comp, prefixes in COMPONENTS.items():
        for p in prefixes:
            if name.startswith(p) and len(p) > best_len:
                best, best_len = comp, len(p)
    if best is None:
        raise KeyError(f"parameter {name!r} belongs to no component")
    return best


def parameter_counts(model: CoCa) -> dict[str, int]:
    counts = {c: 0 for c in COMPONENTS}
    for name, p in model.named_parameters():  # shared parameters are listed once
        counts[_component(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def branch_totals(counts: dict[str, int]) -> tuple[int, int]:
    """(visual branch, language branch); projections and temperature are split evenly."""
    visual = sum(counts[c] for c in VISUAL_COMPONENTS) + counts["projections + temperature"] // 2
    return visual, counts["total"] - visual


def forward_flops(model: CoCa, batch: int = 1) -> dict[str, float]:
    """FLOPs of one ``model(images, tokens)`` call at full context length, per component and total."""
    cfg = model.cfg
    device = next(model.parameters()).device
    images = torch.zeros(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    tokens = torch.ones(batch, cfg.text.context_length, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, tokens)
    per_module = counter.get_flop_counts()
    name = type(model).__name__
    out = {}
    for label, module in (("vision tower (ViT)", "visual"), ("attentional poolers", "gen_pooler"),
                          ("attentional poolers", "contrastive_pooler"), ("text encoder (T5)", "text_encoder"),
                          ("text decoder (T5)", "text_decoder")):
        out[label] = out.get(label, 0) + sum(per_module.get(f"{name}.{module}", {}).values())
    out["total"] = sum(per_module.get("Global", {}).values())
    return out
