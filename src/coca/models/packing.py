"""Packed text: a batch of right-padded captions as one ``[total_tokens, ...]`` sequence of real tokens.

Training at web caption lengths (median ~15 tokens of 77) spends most of the text towers' work
on padding. With a ``TextPacking`` the T5 stacks run their linear layers, feed-forward, norms and
the LM head on the real tokens only; attention stays per caption: each caption's projected
queries, keys and values are scattered back to a ``[B, W, ...]`` layout, W the batch's longest
caption, where the padded attention with its position bias and masks runs unchanged (attention
is ~1% of a T5-Large token's FLOPs per padded position, so the padding it keeps is cheap), and
gathered back. Each caption therefore sees exactly the positions 0..n-1 and the neighbours'
tokens never: the packed computation equals the padded one up to summation order. With
``buckets`` > 1 the batch is split by length into groups (``AttentionGroup``) whose attention
runs re-padded to each group's own longest caption: less padding, which measured faster on CPUs.
With ``kernel="flex"`` attention instead runs on the packed sequence itself through FlexAttention
(``coca.models.attention.document_attention``): a block mask keeps each caption to its own tokens
(and, in the decoder, to the earlier ones; cross-attention to its own image's visual tokens), and
the position bias is a score modifier indexed by in-caption positions. FlexAttention has no
backward on CPUs (torch 2.14), so that kernel is for GPUs; its forward runs everywhere.

Captions must be right-padded (real tokens first, then pad), as every tokenizer call returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


PACKED_KERNELS = ("groups", "flex")


@dataclass
class AttentionGroup:
    """Captions whose attention runs together, re-padded to the group's own longest caption.

    rows: [b] their rows in the batch; width: their longest caption; index: [t] flat positions
    ``i * width + j`` of their real tokens in the [b, width] layout; source: [t] the same tokens'
    places in the packed sequence."""

    rows: Tensor
    width: int
    index: Tensor
    source: Tensor

    def unpack(self, x: Tensor) -> Tensor:
        """Packed [T, ...] -> this group's [b, width, ...], zeros at its padded positions."""
        out = x.new_zeros((self.rows.shape[0] * self.width, *x.shape[1:]))
        return out.index_copy(0, self.index, x.index_select(0, self.source)).view(-1, self.width, *x.shape[1:])

    def pack_into(self, packed: Tensor, x: Tensor) -> Tensor:
        """This group's [b, width, ...] written at its tokens' places of ``packed`` [T, ...]."""
        return packed.index_copy(0, self.source, x.flatten(0, 1).index_select(0, self.index))


@dataclass
class TextPacking:
    """Where the real tokens of a [B, L] right-padded batch sit.

    lengths: [B] real tokens per caption; index: [T] flat positions ``b * width + i`` of the real
    tokens in the [B, width] layout; segments: [T] caption of each packed token; width: the
    longest caption (>= 1); mask: [B, width] bool, True at real tokens; groups: with
    ``buckets`` > 1, captions of similar length whose attention runs re-padded to their own
    longest (empty: the whole batch at ``width``); kernel: "groups" (re-padded attention, the
    groups above) or "flex" (FlexAttention over the packed sequence with document masks)."""

    lengths: Tensor
    index: Tensor
    segments: Tensor
    mask: Tensor
    width: int
    groups: tuple[AttentionGroup, ...] = ()
    kernel: str = "groups"
    _block_masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, tokens: Tensor, pad_id: int, buckets: int = 1, kernel: str = "groups") -> "TextPacking":
        """The packing of ``tokens`` [B, L]. Reads the lengths on the host (one sync). ``buckets``:
        split the batch by length into that many groups of equal size for attention (``kernel``
        "groups"); ``kernel="flex"``: attention over the packed sequence (buckets unused)."""
        if kernel not in PACKED_KERNELS:
            raise ValueError(f"packed attention kernel must be one of {PACKED_KERNELS}, got {kernel!r}")
        lengths = (tokens != pad_id).sum(1)
        on_host = lengths.tolist()
        width = max(max(on_host, default=1), 1)
        positions = torch.arange(width, device=tokens.device)
        mask = positions[None, :] < lengths[:, None]
        index = mask.flatten().nonzero().squeeze(1)
        segments = torch.div(index, width, rounding_mode="floor")
        groups = ()
        if kernel == "groups" and buckets > 1 and len(on_host) >= 2 * buckets:
            starts = lengths.cumsum(0) - lengths  # each caption's first place in the packed sequence
            by_length = sorted(range(len(on_host)), key=on_host.__getitem__)
            size = -(-len(on_host) // buckets)
            groups = tuple(cls._group(sorted(by_length[i:i + size]), on_host, lengths, starts, positions)
                           for i in range(0, len(on_host), size))
        return cls(lengths, index, segments, mask, width, groups, kernel)

    @staticmethod
    def _group(rows: list[int], on_host: list[int], lengths: Tensor, starts: Tensor, positions: Tensor) -> AttentionGroup:
        width = max(max(on_host[r] for r in rows), 1)
        rows_t = torch.tensor(rows, device=lengths.device)
        real = positions[None, :width] < lengths[rows_t][:, None]  # [b, width]
        source = (starts[rows_t][:, None] + positions[None, :width])[real]
        return AttentionGroup(rows_t, width, real.flatten().nonzero().squeeze(1), source)

    @property
    def positions(self) -> Tensor:
        """[T] each packed token's position within its caption."""
        return self.index.remainder(self.width)

    def self_attention_mask(self, causal: bool):
        """FlexAttention block mask over the packed sequence: a token sees its own caption's
        tokens (with ``causal``, those not after it). Built once per packing and kept for every layer."""
        key = ("self", causal)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask
            segments, positions = self.segments, self.positions

            def own_caption(b, h, q, k):
                same = segments[q] == segments[k]
                return same & (positions[k] <= positions[q]) if causal else same
            self._block_masks[key] = create_block_mask(own_caption, None, None, self.total, self.total,
                                                       device=self.index.device)
        return self._block_masks[key]

    def cross_attention_mask(self, tokens_per_image: int):
        """FlexAttention block mask from the packed tokens to every image's visual tokens laid end to
        end (``[B * tokens_per_image]``): a token sees its own image's only."""
        key = ("cross", tokens_per_image)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask
            segments = self.segments

            def own_image(b, h, q, k):
                return segments[q] == torch.div(k, tokens_per_image, rounding_mode="floor")
            self._block_masks[key] = create_block_mask(own_image, None, None, self.total, self.batch * tokens_per_image,
                                                       device=self.index.device)
        return self._block_masks[key]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def total(self) -> int:
        return self.index.shape[0]

    def pack(self, x: Tensor) -> Tensor:
        """[B, L >= width, ...] -> [T, ...]: the real positions, caption after caption."""
        return x[:, :self.width].flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """[T, ...] -> [B, width, ...] with zeros at the padded positions."""
        out = x.new_zeros((self.batch * self.width, *x.shape[1:]))
        return out.index_copy(0, self.index, x).view(self.batch, self.width, *x.shape[1:])

    def mean(self, x: Tensor) -> Tensor:
        """Per-caption mean of packed states [T, D] -> [B, D] (accumulated in fp32, a caption
        without tokens gives zeros)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        sums = torch.zeros(self.batch, x.shape[-1], dtype=dtype, device=x.device)
        sums = sums.index_add(0, self.segments, x.to(dtype))
        return (sums / self.lengths.clamp(min=1)[:, None].to(sums.dtype)).to(x.dtype)
