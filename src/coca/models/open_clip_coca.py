"""open_clip's CoCa, the architecture of its published weights (``coca_ViT-B-32``, ``coca_ViT-L-14``).

    image -> ViT (no final norm) -> pooler (256 queries) -> ln_visual -> [B, 256, E]
         query 0 -> image_proj -> image_embed (L2-normalised); queries 1..255: the decoder's visual tokens
    [<start_of_text>] + text + [CLS] -> causal CLIP text transformer
         CLS state -> ln_final -> text_proj -> text_embed (L2-normalised)
         the text positions' states (no final norm) -> multimodal decoder: per layer causal
         self-attention, then cross-attention to the visual tokens -> ln -> lm_head -> logits

Unlike our T5 family, the decoder reads the text tower's outputs for the same caption, so the
text tower is the decoder's lower half: ``text_decoder`` holds it (shared, under the name
``text_encoder``) and runs it on decoder inputs, with its own KV cache, when it generates.
Everything is causal except the CLS token's mask, so caching both halves is exact.

Parameter names follow ours (``visual``, ``gen_pooler``, ``ln_visual``, ``text_encoder``,
``text_decoder``, ``image_proj``, ``text_proj``); ``coca.convert.open_clip_state`` maps open_clip's.

The CLS mask. open_clip adds to every text row a key mask built from ``text != pad``; for the
CLS token's column it puts "keep" at the front instead of at the end (``correct_cls_mask=False``,
the default and what the released weights were trained with), which shifts the mask one place:
key j is kept when token j-1 is real. Real tokens' rows lose nothing by it (causality already
limits them), but the CLS row sees the first pad position and not a full caption's last token.
``text.cls_mask: legacy`` (the presets' default) reproduces that; ``correct`` keeps exactly the
real tokens and the CLS. Text is always run at the full 76 positions, as open_clip runs it: the
CLS's position embedding and the pads it sees depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import CoCaConfig, TextConfig
from .coca import CoCaBase
from .packing import TextPacking
from .t5 import DecoderCache, LayerCache, WriteAt, cross_for_decoding
from .vit import AttentionalPooler, LayerNorm, ResidualBlock, VisionTransformer


def causal_bias(q_len: int, k_len: int, dtype: torch.dtype, device, offset: int = 0) -> Tensor:
    """Additive [1, 1, q_len, k_len] mask: query i (at position offset + i) sees keys <= its position."""
    seen = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)[None, None]


class CLIPTextTower(nn.Module):
    """CLIP's causal text transformer with a CLS token appended (open_clip ``TextTransformer`` with
    ``embed_cls``). ``forward`` gives the CLS state after ``ln_final`` and the text positions'
    states; ``token_states`` runs text positions only, with a cache when decoding."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + 2, w))  # start + text + CLS
        self.cls_emb = nn.Parameter(torch.empty(w))
        self.blocks = nn.ModuleList([ResidualBlock(w, cfg.num_heads, cfg.d_ff, eps=cfg.ln_eps) for _ in range(cfg.encoder_layers)])
        self.ln_final = LayerNorm(w, eps=cfg.ln_eps)
        self.grad_checkpointing = 0

    def _run(self, x: Tensor, bias: Tensor, caches=None) -> Tensor:
        for i, block in enumerate(self.blocks):
            if caches is None and i < self.grad_checkpointing and self.training:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias, cache=None if caches is None else caches[i])
        return x

    def forward(self, ids: Tensor, inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """ids: [B, S] with the start token first and padding to the full context. Returns (CLS
        state after ln_final [B, D], the S text positions' states [B, S, D])."""
        B, S = ids.shape
        x = self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(B, 1, -1)], dim=1) + self.positional_embedding[:S + 1].to(x.dtype)
        real = ids != self.cfg.pad_id
        keep = torch.ones_like(real[:, :1])
        keys = torch.cat([keep, real] if self.cfg.cls_mask == "legacy" else [real, keep], dim=1)  # [B, S + 1]
        dtype = self.blocks[0].attn.attention_impl.compute_dtype(x)
        bias = causal_bias(S + 1, S + 1, dtype, x.device) + torch.zeros(keys.shape, dtype=dtype, device=x.device).masked_fill(
            ~keys, torch.finfo(dtype).min)[:, None, None, :]
        x = self._run(x, bias.clamp(min=torch.finfo(dtype).min))
        return self.ln_final(x[:, -1]), x[:, :-1]

    def token_states(self, ids: Tensor, offset: int = 0, caches: list[LayerCache] | None = None) -> Tensor:
        """States of text positions offset..offset+L-1 ([B, L] ids), causal; with ``caches`` the
        earlier positions' keys/values come from them and this call's are appended."""
        L = ids.shape[1]
        x = self.embed_tokens(ids) + self.positional_embedding[offset:offset + L].to(self.embed_tokens.weight.dtype)
        dtype = self.blocks[0].attn.attention_impl.compute_dtype(x)
        bias = causal_bias(L, offset + L, dtype, x.device, offset) if L > 1 else None
        return self._run(x, bias, caches)


class MultimodalDecoder(nn.Module):
    """open_clip's ``MultimodalTransformer`` over the text tower's states, with the decoding
    interface of ``T5Decoder`` (``forward`` with a cache, ``new_cache``, ``cross_kv``,
    ``static_step``, ``lm_head``). ``tokens`` are decoder inputs: the start token, then the caption."""

    def __init__(self, cfg: TextConfig, text: CLIPTextTower):
        super().__init__()
        self.cfg = cfg
        w = cfg.d_model
        self.text = text  # shared with the model's text_encoder (named there)
        self.self_blocks = nn.ModuleList([ResidualBlock(w, cfg.num_heads, cfg.d_ff, eps=cfg.ln_eps)
                                          for _ in range(cfg.decoder_layers)])
        self.cross_blocks = nn.ModuleList([ResidualBlock(w, cfg.num_heads, cfg.d_ff, eps=cfg.ln_eps, cross=True)
                                           for _ in range(cfg.decoder_layers)])
        self.final_norm = LayerNorm(w, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(w, cfg.vocab_size, bias=False)
        self.grad_checkpointing = 0

    @property
    def blocks(self) -> nn.ModuleList:
        return self.self_blocks

    def cross_kv(self, visual_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [block.project_kv(visual_tokens) for block in self.cross_blocks]

    def new_cache(self, visual_tokens: Tensor, max_len: int, repeat: int = 1, static: bool = False,
                  rows: int | None = None) -> DecoderCache:
        """As ``T5Decoder.new_cache``: one self-attention cache per layer of both halves (text
        tower first), the visual keys/values once per image; ``static``: a mask table [max_len, 1,
        max_len] (later slots masked) for ``static_step``."""
        cross = cross_for_decoding(self.cross_kv(visual_tokens), repeat, rows)
        B, dtype = cross[0][0].shape[0], cross[0][0].dtype
        heads, dh = self.cfg.num_heads, self.cfg.d_model // self.cfg.num_heads
        layers = [LayerCache(B, heads, max_len, dh, dtype, visual_tokens.device, zeros=static)
                  for _ in range(len(self.text.blocks) + len(self.self_blocks))]
        table = None
        if static:
            mask_dtype = self.self_blocks[0].attn.attention_impl.compute_dtype(cross[0][0])
            table = causal_bias(max_len, max_len, mask_dtype, visual_tokens.device)[0].transpose(0, 1).contiguous()
        return DecoderCache(layers, cross, table)

    def _layers(self, x: Tensor, bias, cross, caches, impl=None) -> Tensor:
        for i, (self_block, cross_block) in enumerate(zip(self.self_blocks, self.cross_blocks)):
            cache = None if caches is None else caches[i]
            if caches is None and i < self.grad_checkpointing and self.training:
                x = checkpoint(self_block, x, bias, use_reentrant=False)
            else:
                x = self_block(x, bias, cache=cache, impl=impl)
            x = cross_block(x, kv=cross[i], impl=impl)
        return x

    def static_step(self, tokens: Tensor, position: Tensor, keys: list[Tensor], values: list[Tensor],
                    cross: list[tuple[Tensor, Tensor]], bias_table: Tensor, impl=None) -> Tensor:
        """One fixed-shape decoding step for ``torch.compile`` (as ``T5Decoder.static_step``)."""
        x = self.text.embed_tokens(tokens) + self.text.positional_embedding.index_select(0, position).to(
            self.text.embed_tokens.weight.dtype)
        bias = bias_table.index_select(0, position)[:, :, None]  # [1, 1, 1, max_len]
        n = len(self.text.blocks)
        for i, block in enumerate(self.text.blocks):
            x = block(x, bias, cache=WriteAt(keys[i], values[i], position), impl=impl)
        writers = [WriteAt(keys[n + i], values[n + i], position) for i in range(len(self.self_blocks))]
        x = self._layers(x, bias, cross, writers, impl)
        return self.lm_head(self.final_norm(x))[:, -1].float()

    def forward(self, tokens: Tensor, visual_tokens: Tensor | None = None, cache: DecoderCache | None = None,
                inputs_embeds: Tensor | None = None, return_hidden: bool = False,
                cross_kv: list[tuple[Tensor, Tensor]] | None = None, packing: TextPacking | None = None,
                text_states: Tensor | None = None) -> Tensor:
        """tokens: [B, L] decoder inputs (with a cache: the new positions only). Returns logits
        [B, L, V] or with ``return_hidden`` the states the LM head reads. ``text_states``: the
        text tower's states of these positions when the caller has them (training runs the tower
        once for both the text embedding and the decoder). ``packing`` is not supported by this
        family and must be None."""
        if packing is not None:
            raise ValueError("the open_clip family does not pack text; run it padded")
        offset = 0 if cache is None else cache.length
        n = len(self.text.blocks)
        if text_states is None:
            text_states = self.text.token_states(tokens, offset, None if cache is None else cache.layers[:n])
        L = text_states.shape[1]
        dtype = self.self_blocks[0].attn.attention_impl.compute_dtype(text_states)
        bias = causal_bias(L, offset + L, dtype, text_states.device, offset) if L > 1 else None
        cross = cache.cross if cache is not None else cross_kv if cross_kv is not None else self.cross_kv(visual_tokens)
        x = self._layers(text_states, bias, cross, None if cache is None else cache.layers[n:])
        hidden = self.final_norm(x)
        return hidden if return_hidden else self.lm_head(hidden)


class OpenCLIPCoCa(CoCaBase):
    """open_clip's CoCa with this project's API: ``encode_image``, ``encode_text``, ``generate``,
    ``score``, ``forward`` for training (the same outputs and loss as ``CoCa``) and ``save_pretrained``.
    Text tokens are rows of ``CLIPTokenizer`` (no start token; the model prepends it)."""

    def __init__(self, cfg: CoCaConfig):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        self.visual = VisionTransformer(v, final_norm=False)
        self.gen_pooler = AttentionalPooler(cfg.embed_dim, v.width, cfg.pooler_heads, cfg.n_gen_queries)
        self.ln_visual = LayerNorm(cfg.embed_dim)
        self.image_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.text_encoder = CLIPTextTower(t)
        self.text_decoder = MultimodalDecoder(t, self.text_encoder)
        self.text_proj = nn.Linear(t.d_model, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """open_clip's initialisation of the text side (the ViT and pooler initialise themselves)."""
        if self.logit_scale.is_meta:
            return
        t, w = self.text_encoder, self.cfg.text.d_model
        nn.init.normal_(t.embed_tokens.weight, std=0.02)
        nn.init.normal_(t.positional_embedding, std=0.01)
        nn.init.normal_(t.cls_emb, std=0.01)
        layers = len(t.blocks)
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * layers) ** -0.5, (2 * w) ** -0.5
        for block in [*t.blocks, *self.text_decoder.self_blocks, *self.text_decoder.cross_blocks]:
            for lin in (getattr(block.attn, "qkv", None), getattr(block.attn, "q", None), getattr(block.attn, "kv", None)):
                if lin is not None:
                    nn.init.normal_(lin.weight, std=attn_std)
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        for proj in (self.text_proj, self.image_proj, self.text_decoder.lm_head):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    def tie_weights(self) -> None:
        """The decoder runs the model's text tower (broken by ``to_empty``; restored here)."""
        self.text_decoder.text = self.text_encoder

    # --- towers ------------------------------------------------------------------------------
    def encode_image_tokens(self, images: Tensor, patch_dropout: float = 0.0) -> tuple[Tensor, Tensor]:
        """(image_embed [B, E] normalised, visual tokens [B, n_gen_queries - 1, E] for the decoder)."""
        self.check_images(images)
        pooled = self.ln_visual(self.gen_pooler(self.visual(images, patch_dropout)))
        return F.normalize(self.image_proj(pooled[:, 0]), dim=-1), pooled[:, 1:]

    def _with_start(self, tokens: Tensor) -> Tensor:
        """[start] + tokens, padded to the full context (the text tower always runs at full length)."""
        t = self.cfg.text
        start = torch.full_like(tokens[:, :1], t.start_id)
        return F.pad(torch.cat([start, tokens], dim=1), (0, t.context_length - tokens.shape[1]), value=t.pad_id)

    def encode_text(self, tokens: Tensor, check_ids: bool = True, pack_text: bool | TextPacking = False) -> Tensor:
        """The CLS token's state, projected and L2-normalised: [B, E]. ``pack_text`` is accepted
        and ignored (this family runs text padded)."""
        self.check_tokens(tokens, values=check_ids)
        pooled, _ = self.text_encoder(self._with_start(tokens))
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images: Tensor, text_tokens: Tensor, return_logits: bool = True,
                pack_text: bool | TextPacking = False, patch_dropout: float = 0.0) -> dict[str, Tensor]:
        """As ``CoCa.forward``: ``logits[:, i]`` predicts ``text_tokens[:, i]``. The text tower runs
        once, on [start] + caption: its CLS gives the text embedding and its states at the start
        and caption positions feed the decoder. ``pack_text`` is ignored (padded)."""
        self.check_tokens(text_tokens, values=False)
        image_embeds, visual_tokens = self.encode_image_tokens(images, patch_dropout)
        pooled, states = self.text_encoder(self._with_start(text_tokens))
        decoded = self.text_decoder(None, visual_tokens, text_states=states[:, :text_tokens.shape[1]],
                                    return_hidden=not return_logits)
        out = {"image_embeds": image_embeds, "text_embeds": F.normalize(self.text_proj(pooled), dim=-1),
               "logit_scale": self.contrastive_scale()}
        out["logits" if return_logits else "decoder_hidden"] = decoded
        return out
