"""Caption generation: greedy, beam search and top-k / top-p sampling, with a KV cache.

With ``use_cache=True`` (the default) each image is encoded once, the cross-attention keys and
values of its visual tokens are projected once per image (and shared by its beams), and every
step feeds only the newest token through the decoder while self-attention keys/values grow by
one position. ``use_cache=False`` recomputes the whole prefix each step; it exists to prove the
cache exact and to measure what it saves.

Output: LongTensor [B, T] of generated ids without the start token. A finished row holds EOS
followed by pad; T is the longest row (at most ``max_new_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

STRATEGIES = ("greedy", "beam", "sample")


class _Stepper:
    """Returns next-token logits [rows, V] for the newest position, with or without the cache."""

    def __init__(self, model, visual_tokens: Tensor, max_len: int, use_cache: bool, repeat: int = 1):
        self.decoder = model.text_decoder
        self.cache = None
        if use_cache:
            self.cache = self.decoder.new_cache(visual_tokens, max_len, repeat=repeat)
        else:
            self.visual = visual_tokens.repeat_interleave(repeat, 0) if repeat > 1 else visual_tokens

    def __call__(self, seq: Tensor) -> Tensor:
        if self.cache is not None:
            return self.decoder(seq[:, -1:], cache=self.cache)[:, -1].float()
        return self.decoder(seq, self.visual)[:, -1].float()

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def _check_args(model, images, max_new_tokens, min_new_tokens, strategy, num_beams, top_k, top_p, temperature):
    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    limit = model.cfg.text.context_length
    if not 1 <= max_new_tokens <= limit:
        raise UserError(f"max_new_tokens must be in [1, {limit}] (the model's context length), got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise UserError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if strategy == "beam" and num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {num_beams}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] or None, got {top_p}")
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature} (use strategy='greedy' for argmax decoding)")
    model.check_images(images)


@torch.no_grad()
def generate(model, images: Tensor, max_new_tokens: int = 30, strategy: str = "greedy", num_beams: int = 4,
             top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
             min_new_tokens: int = 0, length_penalty: float = 1.0, seed: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    _check_args(model, images, max_new_tokens, min_new_tokens, strategy, num_beams, top_k, top_p, temperature)
    _, visual_tokens = model.encode_image_tokens(images)
    if strategy == "beam" and num_beams > 1:
        return _beam_search(model, visual_tokens, max_new_tokens, min_new_tokens, num_beams, length_penalty, use_cache)
    if strategy == "sample" and generator is None and seed is not None:
        generator = torch.Generator(device=images.device).manual_seed(seed)
    sample = None
    if strategy == "sample":
        sample = lambda logits: _sample(logits, temperature, top_k, top_p, generator)  # noqa: E731
    return _greedy_or_sample(model, visual_tokens, max_new_tokens, min_new_tokens, use_cache, sample)


def _greedy_or_sample(model, visual_tokens, max_new_tokens, min_new_tokens, use_cache, sample) -> Tensor:
    pad, eos = model.cfg.text.pad_id, model.cfg.text.eos_id
    B = visual_tokens.shape[0]
    step = _Stepper(model, visual_tokens, max_new_tokens, use_cache)
    seq = torch.full((B, 1), pad, dtype=torch.long, device=visual_tokens.device)
    done = torch.zeros(B, dtype=torch.bool, device=seq.device)
    for t in range(max_new_tokens):
        logits = step(seq)
        if t < min_new_tokens:
            logits[:, eos] = float("-inf")
        nxt = logits.argmax(-1) if sample is None else sample(logits)
        nxt = nxt.masked_fill(done, pad)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return seq[:, 1:]


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> Tensor:
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _beam_search(model, visual_tokens, max_new_tokens, min_new_tokens, K, length_penalty, use_cache) -> Tensor:
    """Batched beam search. Scores are summed log-probabilities; finished hypotheses are ranked by
    score / length**length_penalty. A row stops when it holds K finished hypotheses that no running
    beam can beat (the standard heuristic), or at max_new_tokens."""
    pad, eos = model.cfg.text.pad_id, model.cfg.text.eos_id
    B, device = visual_tokens.shape[0], visual_tokens.device
    step = _Stepper(model, visual_tokens, max_new_tokens, use_cache, repeat=K)
    seq = torch.full((B * K, 1), pad, dtype=torch.long, device=device)
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    row_done = [False] * B
    offsets = (torch.arange(B, device=device) * K)[:, None]
    for t in range(max_new_tokens):
        logprobs = F.log_softmax(step(seq), dim=-1)  # [B*K, V]
        V = logprobs.shape[-1]
        if t < min_new_tokens:
            logprobs[:, eos] = float("-inf")
        cand = (beam_scores.view(-1, 1) + logprobs).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # at most K of these end in EOS
        src_beam, tok = top_idx // V, top_idx % V
        is_eos = tok == eos
        # Finished hypotheses: EOS candidates ranked within the top K.
        for b, r in (is_eos[:, :K]).nonzero().tolist():
            if row_done[b] or top_scores[b, r].item() == float("-inf"):
                continue
            hyp = torch.cat([seq[b * K + src_beam[b, r], 1:], seq.new_tensor([eos])])
            _add_hypothesis(finished[b], float(top_scores[b, r]) / (t + 1) ** length_penalty, hyp, K)
        # Running beams: the best K candidates that do not end in EOS.
        keep = ~is_eos & ((~is_eos).cumsum(1) <= K)
        next_beam = src_beam[keep].view(B, K)
        next_tok = tok[keep].view(B, K)
        beam_scores = top_scores[keep].view(B, K)
        index = (offsets + next_beam).view(-1)
        seq = torch.cat([seq[index], next_tok.view(-1, 1)], dim=1)
        step.reorder(index)
        best_running = (beam_scores.max(1).values / (t + 1) ** length_penalty).tolist()
        for b in range(B):
            if not row_done[b] and len(finished[b]) == K and finished[b][-1][0] >= best_running[b]:
                row_done[b] = True
        if all(row_done):
            break
    for b in range(B):  # rows still running at the length limit: their beams compete too
        if not row_done[b]:
            n = seq.shape[1] - 1
            for k in range(K):
                _add_hypothesis(finished[b], float(beam_scores[b, k]) / n ** length_penalty, seq[b * K + k, 1:], K)
    best = [finished[b][0][1] for b in range(B)]
    out = torch.full((B, max(len(h) for h in best)), pad, dtype=torch.long, device=device)
    for b, h in enumerate(best):
        out[b, :len(h)] = h
    return out


def _add_hypothesis(hyps: list[tuple[float, Tensor]], score: float, tokens: Tensor, K: int) -> None:
    """Keep the K best (score, tokens) pairs, sorted best first."""
    hyps.append((score, tokens.clone()))
    hyps.sort(key=lambda h: h[0], reverse=True)
    del hyps[K:]
