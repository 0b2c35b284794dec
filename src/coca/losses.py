"""CoCa's objective: contrastive (symmetric InfoNCE) + captioning cross-entropy, weighted.

CoCa (Yu et al. 2022, Eq. 4): L = lambda_con * L_con + lambda_cap * L_cap; the described system
weights both equally (1.0, 1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over the batch: image i and text i are the positive pair.

    Embeddings are L2-normalised [B, E]; logit_scale is the (clamped) inverse temperature.
    """
    logits = logit_scale * image_embeds.float() @ text_embeds.float().T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def caption_loss(logits: Tensor, tokens: Tensor, pad_id: int = 0) -> Tensor:
    """Token-level cross-entropy of teacher-forced logits [B, L, V] against tokens [B, L]; pad ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), ignore_index=pad_id)


def contrastive_accuracy(image_embeds: Tensor, text_embeds: Tensor) -> tuple[float, float]:
    """(image->text, text->image) top-1 accuracy of picking the paired item within the batch."""
    sim = image_embeds.float() @ text_embeds.float().T
    labels = torch.arange(sim.shape[0], device=sim.device)
    return (sim.argmax(1) == labels).float().mean().item(), (sim.argmax(0) == labels).float().mean().item()


class CoCaLoss:
    def __init__(self, contrastive_weight: float = 1.0, caption_weight: float = 1.0, pad_id: int = 0):
        self.contrastive_weight, self.caption_weight, self.pad_id = contrastive_weight, caption_weight, pad_id

    def __call__(self, outputs: dict[str, Tensor], tokens: Tensor) -> dict[str, Tensor]:
        con = contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"])
        cap = caption_loss(outputs["logits"], tokens, self.pad_id)
        total = self.contrastive_weight * con + self.caption_weight * cap
        return {"loss": total, "contrastive_loss": con, "caption_loss": cap}
