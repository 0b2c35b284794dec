"""T5 v1.1 text encoder and decoder, weight-compatible with Hugging Face ``T5ForConditionalGeneration``.

Faithful to T5 (Raffel et al. 2020; v1.1 changes): RMSNorm without bias or mean subtraction,
relative position buckets shared by all layers of a stack (bidirectional in the encoder,
causal in the decoder), no 1/sqrt(d) attention scaling (folded into the init), gated-GELU
feed-forward, untied LM head. Attention runs through ``scaled_dot_product_attention`` with the
position bias passed as an additive mask. Self-attention projections are fused into one matmul.

The decoder keeps a KV cache for generation: self-attention keys/values are written into a
preallocated buffer one step at a time; cross-attention keys/values of the visual tokens are
computed once (``DecoderCache.cross``) and reused for every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from .attention import SDPA, AttentionImpl, attention, document_attention
from .packing import TextPacking


class RMSNorm(nn.Module):
    """T5LayerNorm: x / rms(x) * weight, computed in fp32, no bias and no mean subtraction."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Map (key_pos - query_pos) to a bucket: exact for small distances, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)  # future positions all fall into bucket 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), shared across the layers of a stack."""

    def __init__(self, cfg: TextConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.embedding = nn.Embedding(cfg.relative_buckets, cfg.num_heads)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> Tensor:
        """Returns [1, H, q_len, k_len] bias for queries at positions q_offset..q_offset+q_len-1."""
        device = self.embedding.weight.device
        q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head attention without bias terms and without 1/sqrt(d_kv) scaling (T5 convention)."""

    def __init__(self, cfg: TextConfig, cross: bool = False):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.cross = cross
        if cross:
            self.q = nn.Linear(cfg.d_model, inner, bias=False)
            self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        else:
            self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.attention_impl = SDPA  # chosen by whoever runs the model: ``set_attention``

    def _heads(self, x: Tensor, n: int) -> Tensor:
        # [B, L, n*H*Dh] -> n x [B, H, L, Dh]
        B, L, _ = x.shape
        return x.view(B, L, n, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values [B, H, N, Dh] of a context; computed once per image when decoding."""
        return self._heads(self.kv(context), 2)

    def forward(self, x: Tensor, bias: Tensor | None, kv: tuple[Tensor, Tensor] | None = None,
                cache: "LayerCache | None" = None, impl: AttentionImpl | None = None,
                packing: TextPacking | None = None) -> Tensor:
        """x: [B, L, D], or packed [T, D] with ``packing``. bias: additive [B|1, H, L, S] (position
        bias + masks) or None; with ``packing``, L = S = ``packing.width`` (self-attention), and
        with its ``groups`` one such bias per group, at the group's width.

        Self-attention: keys/values come from x (and, with a cache, from the earlier steps).
        Cross-attention: ``kv`` holds the projected context keys/values. ``impl`` overrides
        ``attention_impl`` for this call (the compiled decoding step's kernel). Packed: the
        projections run on the real tokens, attention per caption in the [B, width] layout.
        """
        projected = self.q(x) if self.cross else self.qkv(x)
        if packing is not None and packing.kernel == "flex":
            return self.o(self._attend_packed(projected, bias, kv, packing, impl))
        if packing is not None and packing.groups:  # bias: one per group, sized to it
            out = None
            for g, group_bias in zip(packing.groups, bias if bias is not None else [None] * len(packing.groups)):
                group_kv = None if kv is None else tuple(t.index_select(0, g.rows) for t in kv)
                res = self._attend(g.unpack(projected), group_bias, group_kv, None, impl)
                out = g.pack_into(res.new_zeros(packing.total, res.shape[-1]) if out is None else out, res)
            return self.o(out)
        if packing is not None:
            out = self._attend(packing.unpack(projected), bias, kv, None, impl)
            return self.o(packing.pack(out))
        return self.o(self._attend(projected, bias, kv, cache, impl))

    def _attend_packed(self, projected: Tensor, bias, kv, packing: TextPacking, impl) -> Tensor:
        """FlexAttention on the packed sequence itself: [T, n*H*Dh] -> [T, H*Dh]. Self-attention:
        ``bias`` is (block mask, position score); cross-attention: every image's keys/values laid
        end to end, each caption masked to its own image's."""
        if self.training and self.dropout > 0:
            raise ValueError("packed attention with kernel 'flex' has no attention dropout; use kernel 'groups'")
        T = projected.shape[0]
        if self.cross:
            q = projected.view(1, T, self.n_heads, self.d_kv).transpose(1, 2)
            k, v = (t.transpose(0, 1).flatten(1, 2)[None] for t in kv)  # [B, H, N, Dh] -> [1, H, B*N, Dh]
            block_mask, score = packing.cross_attention_mask(kv[0].shape[2]), None
        else:
            q, k, v = projected.view(1, T, 3, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)
            block_mask, score = bias
        out = document_attention(q, k, v, block_mask, score, scale=1.0, impl=impl or self.attention_impl)
        return out[0].transpose(0, 1).reshape(T, self.n_heads * self.d_kv)

    def _attend(self, projected: Tensor, bias: Tensor | None, kv, cache, impl) -> Tensor:
        """Projected queries (and self-attention keys/values) [B, L, n*H*Dh] -> attention output [B, L, H*Dh]."""
        B, L, _ = projected.shape
        if self.cross:
            q = self._heads(projected, 1)[0]
            k, v = kv
        else:
            q, k, v = self._heads(projected, 3)
            if cache is not None:
                k, v = cache.append(k, v)
        out = attention(q, k, v, bias, dropout_p=self.dropout if self.training else 0.0, scale=1.0,
                        impl=impl or self.attention_impl)
        return out.transpose(1, 2).reshape(B, L, self.n_heads * self.d_kv)


class GatedGeluFFN(nn.Module):
    """T5 v1.1 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)))


class T5Block(nn.Module):
    """Pre-norm residual block: self-attention, [cross-attention], feed-forward."""

    def __init__(self, cfg: TextConfig, cross: bool):
        super().__init__()
        self.ln_self = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.self_attn = T5Attention(cfg)
        if cross:
            self.ln_cross = RMSNorm(cfg.d_model, cfg.ln_eps)
            self.cross_attn = T5Attention(cfg, cross=True)
        self.ln_ff = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.ff = GatedGeluFFN(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor | None, cross_kv: tuple[Tensor, Tensor] | None = None,
                cache: "LayerCache | None" = None, impl: AttentionImpl | None = None,
                packing: TextPacking | None = None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.ln_self(x), bias, cache=cache, impl=impl, packing=packing))
        if cross_kv is not None:
            x = x + self.dropout(self.cross_attn(self.ln_cross(x), None, kv=cross_kv, impl=impl, packing=packing))
        return x + self.dropout(self.ff(self.ln_ff(x)))


def packed_position_bias(table: Tensor, packing: TextPacking, causal: bool):
    """Self-attention "bias" of the flex kernel: the block mask of each caption's own tokens and a
    score modifier adding ``table`` [H, width, width] (the position bias) at the in-caption positions."""
    positions = packing.positions

    def position_score(score, b, h, q, k):
        return score + table[h, positions[q], positions[k]]
    return packing.self_attention_mask(causal), position_score


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, S] bool (True = attend) -> additive [B, 1, 1, S]."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]


class T5Encoder(nn.Module):
    """Bidirectional T5 stack. ``forward(tokens) -> [B, L, d_model]`` after the final RMSNorm."""

    def __init__(self, cfg: TextConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.position_bias = RelativePositionBias(cfg, bidirectional=True)
        self.blocks = nn.ModuleList([T5Block(cfg, cross=False) for _ in range(cfg.encoder_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention_impl = SDPA  # sets the position bias's dtype; ``set_attention`` changes it
        self.grad_checkpointing = 0  # the first N blocks recompute their forward in backward

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                packing: TextPacking | None = None) -> Tensor:
        """tokens: [B, L] ids; attention_mask: [B, L] (1 = real token), default tokens != pad_id.
        ``inputs_embeds`` (the embedded tokens) may be passed when the caller already looked them up.
        Returns [B, L, d_model]; with ``packing`` the real tokens only, [T, d_model] (``inputs_embeds``
        then packed too, and ``attention_mask`` unused)."""
        if packing is not None:
            L, attention_mask = packing.width, packing.mask
            embeds = self.embed_tokens(packing.pack(tokens)) if inputs_embeds is None else inputs_embeds
        else:
            L = tokens.shape[1]
            attention_mask = tokens != self.cfg.pad_id if attention_mask is None else attention_mask
            embeds = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        x = self.dropout(embeds)
        bias_dtype = self.attention_impl.compute_dtype(x)
        if packing is not None and packing.kernel == "flex":
            bias = packed_position_bias(self.position_bias(L, L)[0].to(bias_dtype), packing, causal=False)
        elif packing is not None and packing.groups:  # each group's bias, its top-left corner
            position = self.position_bias(L, L).to(bias_dtype)
            bias = [position[..., :g.width, :g.width] + padding_bias(attention_mask[g.rows, :g.width], bias_dtype)
                    for g in packing.groups]
        else:
            bias = self.position_bias(L, L).to(bias_dtype) + padding_bias(attention_mask.bool(), bias_dtype)
        for i, block in enumerate(self.blocks):
            if i < self.grad_checkpointing and self.training:
                x = checkpoint(block, x, bias, packing=packing, use_reentrant=False)
            else:
                x = block(x, bias, packing=packing)
        return self.dropout(self.final_norm(x))


class LayerCache:
    """Self-attention keys/values of one decoder layer, preallocated to the maximum length."""

    def __init__(self, batch: int, n_heads: int, max_len: int, d_kv: int, dtype, device, zeros: bool = False):
        # zeros for the static step, which attends over every slot: a masked slot weighs exactly 0,
        # and 0 * garbage could be NaN
        allocate = torch.zeros if zeros else torch.empty
        self.k = allocate(batch, n_heads, max_len, d_kv, dtype=dtype, device=device)
        self.v = allocate(batch, n_heads, max_len, d_kv, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Row i takes row index[i]'s history; rows past len(index) (a static cache's padding) stay."""
        rows = len(index)
        self.k[:rows, :, :self.length] = self.k[index, :, :self.length]
        self.v[:rows, :, :self.length] = self.v[index, :, :self.length]


class WriteAt:
    """The static step's stand-in for ``LayerCache`` inside attention: writes the new keys/values
    at ``position`` (a 1-element tensor, so one compiled graph serves every step) and attends over
    the whole fixed-size buffer; the bias masks the slots not written yet."""

    def __init__(self, k: Tensor, v: Tensor, position: Tensor):
        self.k, self.v, self.position = k, v, position

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, self.position, k)
        self.v.index_copy_(2, self.position, v)
        return self.k, self.v


class DecoderCache:
    """Per-layer self-attention caches plus the cross-attention keys/values of the visual tokens.
    A static cache (for ``T5Decoder.static_step``) also holds ``bias_table`` [max_len, H, max_len]:
    the position bias of every query position over every key slot, later slots masked."""

    def __init__(self, layers: list[LayerCache], cross: list[tuple[Tensor, Tensor]], bias_table: Tensor | None = None):
        self.layers, self.cross, self.bias_table = layers, cross, bias_table

    @property
    def length(self) -> int:
        return self.layers[0].length

    def advance(self, n: int = 1) -> None:
        """The static step wrote ``n`` more positions."""
        for layer in self.layers:
            layer.length += n

    def reorder(self, index: Tensor) -> None:
        """Beam search: row i takes the history of row index[i]. Cross keys/values are identical
        within a beam group, so they are never moved."""
        for layer in self.layers:
            layer.reorder(index)


def cross_for_decoding(cross: list[tuple[Tensor, Tensor]], repeat: int = 1, rows: int | None = None):
    """Per-layer cross-attention keys/values of the images, laid out for a decoding cache: each
    image's repeated for its ``repeat`` beams or samples (one projection serves them all), padded to
    ``rows`` with copies of the last row (the compiled step's fixed shapes), contiguous."""
    if repeat > 1:
        cross = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in cross]
    if rows is not None and rows > cross[0][0].shape[0]:
        extra = rows - cross[0][0].shape[0]
        cross = [(torch.cat([k, k[-1:].expand(extra, -1, -1, -1)]), torch.cat([v, v[-1:].expand(extra, -1, -1, -1)]))
                 for k, v in cross]
    # contiguous once here: the projection's [B, N, 2, H, Dh] views would be copied by every step
    return [(k.contiguous(), v.contiguous()) for k, v in cross]


class T5Decoder(nn.Module):
    """Causal T5 stack with cross-attention to the visual tokens, final RMSNorm and untied LM head.

    ``forward(tokens, visual_tokens) -> [B, L, vocab]`` logits, equal to HF
    ``T5ForConditionalGeneration(encoder_outputs=(visual_tokens,), decoder_input_ids=tokens).logits``.
    """

    def __init__(self, cfg: TextConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.position_bias = RelativePositionBias(cfg, bidirectional=False)
        self.blocks = nn.ModuleList([T5Block(cfg, cross=True) for _ in range(cfg.decoder_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention_impl = SDPA  # sets the position bias's dtype; ``set_attention`` changes it
        self.grad_checkpointing = 0  # the first N blocks recompute their forward in backward

    def cross_kv(self, visual_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [block.cross_attn.project_kv(visual_tokens) for block in self.blocks]

    def new_cache(self, visual_tokens: Tensor, max_len: int, repeat: int = 1, static: bool = False,
                  rows: int | None = None) -> DecoderCache:
        """Allocate a cache for ``max_len`` decoder positions and project the visual keys/values
        once per image; with ``repeat`` (beam search) each image's projection serves its beams.
        ``static``: zero-filled buffers and the bias table that ``static_step`` reads. ``rows``:
        pad to that many rows with copies of the last (fixed shapes for the compiled step)."""
        cross = cross_for_decoding(self.cross_kv(visual_tokens), repeat, rows)
        B, dtype = cross[0][0].shape[0], cross[0][0].dtype
        layers = [LayerCache(B, self.cfg.num_heads, max_len, self.cfg.d_kv, dtype, visual_tokens.device, zeros=static)
                  for _ in self.blocks]
        bias_table = None
        if static:
            bias_dtype = self.attention_impl.compute_dtype(cross[0][0])
            bias = self.position_bias(max_len, max_len)[0].to(bias_dtype)  # [H, query, key]
            future = torch.ones(max_len, max_len, dtype=torch.bool, device=bias.device).triu(diagonal=1)
            bias_table = bias.masked_fill(future, torch.finfo(bias_dtype).min).transpose(0, 1).contiguous()
        return DecoderCache(layers, cross, bias_table)

    def static_step(self, tokens: Tensor, position: Tensor, keys: list[Tensor], values: list[Tensor],
                    cross: list[tuple[Tensor, Tensor]], bias_table: Tensor, impl: AttentionImpl | None = None) -> Tensor:
        """One decoding step with fixed shapes, for ``torch.compile``: ``tokens`` [B, 1] at
        ``position`` (LongTensor [1]); ``keys``/``values``/``cross``/``bias_table`` from a static
        ``new_cache``. Writes this position's keys/values and returns next-token logits [B, V] (fp32).
        Same blocks and arithmetic as the cached ``forward``; only the shapes stay constant.
        ``impl``: the attention implementation of this step (default: the blocks' own)."""
        x = self.embed_tokens(tokens)
        bias = bias_table.index_select(0, position)[:, :, None]  # [1, H, 1, max_len]
        for i, block in enumerate(self.blocks):
            x = block(x, bias, cross[i], WriteAt(keys[i], values[i], position), impl=impl)
        return self.lm_head(self.final_norm(x))[:, -1].float()

    def forward(self, tokens: Tensor, visual_tokens: Tensor | None = None, cache: DecoderCache | None = None,
                inputs_embeds: Tensor | None = None, return_hidden: bool = False,
                cross_kv: list[tuple[Tensor, Tensor]] | None = None, packing: TextPacking | None = None) -> Tensor:
        """tokens: [B, L] decoder inputs (start token = pad). visual_tokens: [B, N, d_model].
        Returns logits [B, L, V], or with ``return_hidden`` the states the LM head reads [B, L, D]
        (for a loss that applies the head in chunks).

        With ``cache``, tokens are the new positions only and visual_tokens may be omitted; so may
        they with ``cross_kv`` (keys/values from ``cross_kv()``, e.g. one image's shared by many captions).
        With ``packing`` (training; no cache) only the first ``lengths[b]`` positions of each row are
        computed: logits [T, V] or states [T, D] of the packed positions (``inputs_embeds`` packed too).
        """
        if packing is not None:
            L = packing.width
            embeds = self.embed_tokens(packing.pack(tokens)) if inputs_embeds is None else inputs_embeds
        else:
            L = tokens.shape[1]
            embeds = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        x = self.dropout(embeds)
        offset = 0 if cache is None else cache.length
        total = offset + L
        bias_dtype = self.attention_impl.compute_dtype(x)
        bias = self.position_bias(L, total, q_offset=offset).to(bias_dtype)
        if packing is not None and packing.kernel == "flex":  # causality in the block mask
            bias = packed_position_bias(bias[0], packing, causal=True)
        elif L > 1:  # causal mask within the new positions; a single new token may see everything
            causal = torch.ones(L, total, dtype=torch.bool, device=x.device).tril(diagonal=offset)
            bias = bias.masked_fill(~causal, torch.finfo(bias_dtype).min)
        if packing is not None and packing.groups:  # relative positions and causality: the same corner
            bias = [bias[..., :g.width, :g.width] for g in packing.groups]
        cross = cache.cross if cache is not None else cross_kv if cross_kv is not None else self.cross_kv(visual_tokens)
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if i < self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, bias, cross[i], packing=packing, use_reentrant=False)
            else:
                x = block(x, bias, cross[i], layer_cache, packing=packing)
        hidden = self.dropout(self.final_norm(x))
        return hidden if return_hidden else self.lm_head(hidden)


def init_t5_weights(module: nn.Module, cfg: TextConfig) -> None:
    """T5's initialisation (Mesh TF): attention scaling lives here, not in the forward pass."""
    d, dkv, H, dff = cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff
    for m in module.modules():
        if isinstance(m, T5Attention):
            inner = H * dkv
            if m.cross:
                nn.init.normal_(m.q.weight, std=(d * dkv) ** -0.5)
                nn.init.normal_(m.kv.weight, std=d ** -0.5)
            else:
                nn.init.normal_(m.qkv.weight[:inner], std=(d * dkv) ** -0.5)
                nn.init.normal_(m.qkv.weight[inner:], std=d ** -0.5)
            nn.init.normal_(m.o.weight, std=inner ** -0.5)
        elif isinstance(m, GatedGeluFFN):
            nn.init.normal_(m.wi_0.weight, std=d ** -0.5)
            nn.init.normal_(m.wi_1.weight, std=d ** -0.5)
            nn.init.normal_(m.wo.weight, std=dff ** -0.5)
        elif isinstance(m, RelativePositionBias):
            nn.init.normal_(m.embedding.weight, std=d ** -0.5)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, T5Decoder):
            nn.init.normal_(m.lm_head.weight, std=d ** -0.5)
