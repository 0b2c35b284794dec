"""CoCa's objective: contrastive (symmetric InfoNCE) + captioning cross-entropy, weighted.

CoCa (Yu et al. 2022, Eq. 4): L = lambda_con * L_con + lambda_cap * L_cap; the described system
weights both equally (1.0, 1.0).

One loss for one process and for many. Each rank all-gathers the image and text embeddings *with
gradients* and computes the loss of its own rows against all gathered columns, so the negatives
are the whole global batch. A rank's loss is a sum over its rows scaled by world_size /
global_rows (the caption loss a sum over its tokens scaled by world_size / global_tokens), so the
engines' gradient average over ranks is exactly the gradient of the loss on the global batch,
also when ranks hold different numbers of samples (skipped bad samples). With a world of one
these are the plain batch means. The process group comes in as an argument (``Collectives``:
``coca.train.distributed.World`` in training, one process by default), so this module imports
nothing from the training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Collectives(Protocol):
    """What the losses need of the process group."""
    world_size: int

    @property
    def parallel(self) -> bool: ...

    def row_counts(self, n: int, device) -> list[int]:
        """Rows each rank holds this step."""

    def gather_rows(self, x: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor, int]:
        """Every rank's rows with gradients, padded to the longest: (rows, valid-row mask, offset of this rank's)."""

    def global_sum(self, value, device) -> float:
        """The sum of ``value`` over ranks, on the host."""


class OneProcess:
    """``Collectives`` of a single process: nothing to exchange."""
    world_size, parallel = 1, False

    def row_counts(self, n: int, device) -> list[int]:
        return [n]

    def gather_rows(self, x: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor, int]:
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0

    def global_sum(self, value, device) -> float:
        return float(value)


ONE_PROCESS = OneProcess()


@dataclass
class Losses:
    """This rank's shares of the weighted total and of each part (their mean over ranks is the
    global-batch loss)."""

    loss: Tensor
    contrastive: Tensor
    caption: Tensor

    def as_floats(self) -> dict[str, float]:  # a host sync: for log steps only
        return {"loss": float(self.loss), "contrastive_loss": float(self.contrastive),
                "caption_loss": float(self.caption)}


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, world: Collectives = ONE_PROCESS) -> Tensor:
    """Symmetric InfoNCE: image i and text i are the positive pair, every other text (image) of the
    global batch a negative. Embeddings are L2-normalised [B, E]; logit_scale the clamped inverse
    temperature. Returns this rank's share: sum over its rows x world / global rows."""
    sizes = world.row_counts(image_embeds.shape[0], image_embeds.device)
    all_text, valid, offset = world.gather_rows(text_embeds.float(), sizes)
    all_image, _, _ = world.gather_rows(image_embeds.float(), sizes)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    i2t = (logit_scale * image_embeds.float() @ all_text.T).masked_fill(~valid, float("-inf"))  # [B, W*B]
    t2i = (logit_scale * text_embeds.float() @ all_image.T).masked_fill(~valid, float("-inf"))
    loss_sum = (F.cross_entropy(i2t, labels, reduction="sum") + F.cross_entropy(t2i, labels, reduction="sum")) / 2
    return loss_sum * world.world_size / sum(sizes)


def caption_loss(logits: Tensor, tokens: Tensor, pad_id: int = 0, world: Collectives = ONE_PROCESS,
                 global_tokens: float | None = None) -> Tensor:
    """Token cross-entropy of teacher-forced logits [B, L, V] against tokens [B, L], pad ignored:
    this rank's share of the mean over the global batch's tokens."""
    flat_logits, flat_tokens = logits.float().flatten(0, 1), tokens.flatten()
    if global_tokens is None:
        if not world.parallel:  # the plain mean: no token count on the host, so no device sync
            return F.cross_entropy(flat_logits, flat_tokens, ignore_index=pad_id)
        global_tokens = world.global_sum((tokens != pad_id).sum(), tokens.device)
    loss_sum = F.cross_entropy(flat_logits, flat_tokens, ignore_index=pad_id, reduction="sum")
    return loss_sum * world.world_size / max(global_tokens, 1.0)


def _ce_sum(hidden: Tensor, weight: Tensor, tokens: Tensor, pad_id: int) -> Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), tokens, ignore_index=pad_id, reduction="sum")


def chunked_caption_loss(hidden: Tensor, lm_head_weight: Tensor, tokens: Tensor, pad_id: int = 0,
                         chunk_tokens: int = 4096, world: Collectives = ONE_PROCESS, global_tokens: float | None = None) -> Tensor:
    """``caption_loss`` from the decoder's final states [B, L, D] and the LM head weight [V, D],
    ``chunk_tokens`` positions at a time: each chunk's logits are made, reduced to a sum of
    cross-entropies and freed, then made again in backward (activation checkpointing), so the
    [B x L, V] float32 logits of a 32k vocabulary never exist whole. Same value and gradients as
    ``caption_loss`` (up to summation order)."""
    from torch.utils.checkpoint import checkpoint
    h, t = hidden.flatten(0, 1), tokens.flatten()
    loss_sum = sum(checkpoint(_ce_sum, h[i:i + chunk_tokens], lm_head_weight, t[i:i + chunk_tokens], pad_id,
                              use_reentrant=False) for i in range(0, t.shape[0], chunk_tokens))
    if global_tokens is None:
        if not world.parallel:  # divide by the count on the device: no sync
            return loss_sum / (t != pad_id).sum().clamp(min=1)
        global_tokens = world.global_sum((t != pad_id).sum(), tokens.device)
    return loss_sum * world.world_size / max(global_tokens, 1.0)


def contrastive_accuracy(image_embeds: Tensor, text_embeds: Tensor) -> tuple[float, float]:
    """(image->text, text->image) top-1 accuracy of picking the paired item within the batch."""
    sim = image_embeds.float() @ text_embeds.float().T
    labels = torch.arange(sim.shape[0], device=sim.device)
    return (sim.argmax(1) == labels).float().mean().item(), (sim.argmax(0) == labels).float().mean().item()


class CoCaLoss:
    """``caption_chunk_tokens`` > 0: the caption loss applies the LM head in chunks of that many
    positions (``chunked_caption_loss``); the model must then be called with ``return_logits=False``
    (``wants_logits`` says which), and ``lm_head_weight`` given."""

    def __init__(self, contrastive_weight: float = 1.0, caption_weight: float = 1.0, pad_id: int = 0,
                 world: Collectives = ONE_PROCESS, caption_chunk_tokens: int = 0, lm_head_weight: Tensor | None = None):
        self.contrastive_weight, self.caption_weight, self.pad_id, self.world = \
            contrastive_weight, caption_weight, pad_id, world
        self.chunk, self.lm_head_weight = caption_chunk_tokens, lm_head_weight
        if self.chunk and lm_head_weight is None:
            raise ValueError("a chunked caption loss needs the LM head weight")

    @property
    def wants_logits(self) -> bool:
        return not self.chunk

    def caption(self, outputs: dict[str, Tensor], tokens: Tensor, global_tokens: float | None = None) -> Tensor:
        """A packed forward (``pack_text``) brings its own targets, the real tokens only."""
        tokens = outputs.get("caption_targets", tokens)
        if self.chunk:
            return chunked_caption_loss(outputs["decoder_hidden"], self.lm_head_weight, tokens, self.pad_id,
                                        self.chunk, self.world, global_tokens)
        return caption_loss(outputs["logits"], tokens, self.pad_id, self.world, global_tokens)

    def __call__(self, outputs: dict[str, Tensor], tokens: Tensor) -> Losses:
        con = contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], self.world)
        cap = self.caption(outputs, tokens)
        return Losses(self.contrastive_weight * con + self.caption_weight * cap, con, cap)
