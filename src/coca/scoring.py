"""Caption likelihood under the decoder: log p(caption | image), teacher-forced.

``score(model, images, tokens)`` scores pair i = (image i, caption i); with ``pairwise=True`` every
image against every caption ([B, T] results), projecting each image's cross-attention keys/values
once and sharing them (as an expanded view, no copy) across that image's captions. The LM head is
applied only at caption positions (pad skipped), a bounded number of positions at a time, so the
[rows, length, vocabulary] logits are never held whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOGIT_POSITIONS = 2048  # LM-head rows per chunk: 2048 x 32k vocabulary = 256 MB of fp32 logits


@dataclass
class CaptionScores:
    """``sum``: log-likelihood of each caption's tokens (EOS included, pad excluded); ``mean``: per
    token. Shapes [N] for pairs, [B, T] for ``pairwise``; ``num_tokens`` [N] or [T]."""
    sum: Tensor
    mean: Tensor
    num_tokens: Tensor


def token_logprobs(decoder, tokens: Tensor, visual_tokens: Tensor | None = None, cross=None,
                   pad_id: int = 0, start_id: int | None = None) -> Tensor:
    """[N, L] fp32 log p(tokens[:, i] | image, tokens[:, :i]); 0 at pad positions. The decoder
    inputs start with ``start_id`` (default ``pad_id``, T5's start)."""
    start = torch.full_like(tokens[:, :1], pad_id if start_id is None else start_id)
    hidden = decoder(torch.cat([start, tokens[:, :-1]], 1), visual_tokens, cross_kv=cross, return_hidden=True)
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    real = tokens != pad_id
    h, t = hidden[real], tokens[real]
    picked = []
    for i in range(0, t.shape[0], LOGIT_POSITIONS):
        logits = decoder.lm_head(h[i:i + LOGIT_POSITIONS]).float()
        picked.append(logits.gather(1, t[i:i + LOGIT_POSITIONS, None])[:, 0] - logits.logsumexp(-1))
    if picked:
        out[real] = torch.cat(picked)
    return out


@torch.no_grad()
def score(model, images: Tensor, tokens: Tensor, pairwise: bool = False, batch_size: int = 64) -> CaptionScores:
    """Caption log-likelihoods; ``tokens`` as the tokenizer writes them ([N, L]: pieces, EOS, pad)."""
    model.check_images(images)
    model.check_tokens(tokens, "captions")
    if not pairwise and images.shape[0] != tokens.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} captions: pairs need one caption per "
                         "image (or pass pairwise=True to score every image against every caption)")
    tokens = tokens.to(images.device)
    pad, start = model.cfg.text.pad_id, model.cfg.text.start_id
    counts = (tokens != pad).sum(1)
    decoder = model.text_decoder
    if not pairwise:
        sums = []
        for i in range(0, tokens.shape[0], batch_size):
            visual = model.encode_image_tokens(images[i:i + batch_size])[1]
            sums.append(token_logprobs(decoder, tokens[i:i + batch_size], visual, pad_id=pad, start_id=start).sum(1))
        total = torch.cat(sums)
        return CaptionScores(total, total / counts.clamp(min=1), counts)
    rows = []
    for i in range(0, images.shape[0], batch_size):
        cross = decoder.cross_kv(model.encode_image_tokens(images[i:i + batch_size])[1])
        for b in range(cross[0][0].shape[0]):
            row = []
            for j in range(0, tokens.shape[0], batch_size):
                n = min(batch_size, tokens.shape[0] - j)
                mine = [(k[b:b + 1].expand(n, -1, -1, -1), v[b:b + 1].expand(n, -1, -1, -1)) for k, v in cross]
                row.append(token_logprobs(decoder, tokens[j:j + n], cross=mine, pad_id=pad, start_id=start).sum(1))
            rows.append(torch.cat(row))
    total = torch.stack(rows)
    return CaptionScores(total, total / counts.clamp(min=1), counts)
