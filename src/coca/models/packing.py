"""Packed text: a batch of right-padded captions as one ``[total_tokens, ...]`` sequence of real tokens.

Training at web caption lengths (median ~15 tokens of 77) spends most of the text towers' work
on padding. With a ``TextPacking`` the T5 stacks run their linear layers, feed-forward, norms and
the LM head on the real tokens only; attention stays per caption: each caption's projected
queries, keys and values are scattered back to a ``[B, W, ...]`` layout, W the batch's longest
caption, where the padded attention with its position bias and masks runs unchanged (attention
is ~1% of a T5-Large token's FLOPs per padded position, so the padding it keeps is cheap), and
gathered back. Each caption therefore sees exactly the positions 0..n-1 and the neighbours'
tokens never: the packed computation equals the padded one up to summation order.

Captions must be right-padded (real tokens first, then pad), as every tokenizer call returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextPacking:
    """Where the real tokens of a [B, L] right-padded batch sit.

    lengths: [B] real tokens per caption; index: [T] flat positions ``b * width + i`` of the real
    tokens in the [B, width] layout; segments: [T] caption of each packed token; width: the
    longest caption (>= 1); mask: [B, width] bool, True at real tokens."""

    lengths: Tensor
    index: Tensor
    segments: Tensor
    mask: Tensor
    width: int

    @classmethod
    def of(cls, tokens: Tensor, pad_id: int) -> "TextPacking":
        """The packing of ``tokens`` [B, L]. Reads the longest length on the host (one sync)."""
        lengths = (tokens != pad_id).sum(1)
        width = max(int(lengths.max()) if tokens.shape[0] else 1, 1)
        mask = torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]
        index = mask.flatten().nonzero().squeeze(1)
        segments = torch.div(index, width, rounding_mode="floor")
        return cls(lengths, index, segments, mask, width)

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
