"""CLIP-compatible Vision Transformer and the attentional poolers of CoCa.

The ViT follows CLIP (Radford et al. 2021): a bias-free patch convolution, a class token,
learned absolute positions, ``ln_pre``, pre-LN residual blocks, and ``ln_post`` — here applied
to every token, because CoCa pools the whole token sequence rather than the class token.
Most parameter names are open_clip's (``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``ln_post``, and per block ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``); three are
not, and ``coca.convert.vit_state_from_clip`` renames them when it imports CLIP / open_clip weights:
open_clip's ``transformer.resblocks.N`` is ``blocks.N`` here, its ``attn.in_proj_weight`` /
``attn.in_proj_bias`` are ``attn.qkv.weight`` / ``attn.qkv.bias``, and its ``attn.out_proj`` is
``attn.out``. CLIP's output projection (``proj``) is not imported: CoCa pools and projects with
its own layers. The tensors themselves map one to one, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from .attention import SDPA, attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype, then cast back: the same numerics
    under autocast (which runs layer_norm in fp32) and with bf16 weights (DeepSpeed BF16)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP checkpoints were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiHeadAttention(nn.Module):
    """Standard biased multi-head attention (nn.MultiheadAttention's weights, SDPA compute)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.self_attention = kv_dim is None
        if self.self_attention:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.attention_impl = SDPA  # chosen by whoever runs the model: ``set_attention``

    def _split(self, x: Tensor, n: int) -> tuple[Tensor, ...]:
        B, L, _ = x.shape  # [B, L, n*dim] -> n x [B, heads, L, head_dim]
        return x.view(B, L, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values [B, heads, N, head_dim] of a context (computed once per image
        when decoding)."""
        return self._split(self.kv(context), 2)

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None,
                cache=None, kv: tuple[Tensor, Tensor] | None = None, impl=None) -> Tensor:
        """Self-attention over x, or cross-attention to ``context`` (or its projected ``kv``).
        ``bias``: an additive mask [B|1, heads|1, L, S]; ``cache``: self-attention keys/values of
        earlier positions that this call appends to (``LayerCache``); ``impl`` overrides the kernel."""
        B, L, _ = x.shape
        if self.self_attention:
            q, k, v = self._split(self.qkv(x), 3)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            (q,) = self._split(self.q(x), 1)
            k, v = kv if kv is not None else self.project_kv(context)
        out = attention(q, k, v, bias, impl=impl or self.attention_impl)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))


class ResidualBlock(nn.Module):
    """CLIP's pre-LN block (open_clip ``ResidualAttentionBlock``): attention, then an MLP. With
    ``cross``: attention from x to a context, normalised by its own ``ln_1_kv`` (open_clip's
    cross-attention block of the CoCa decoder)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str = "gelu", eps: float = 1e-5, cross: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        if cross:
            self.ln_1_kv = LayerNorm(width, eps=eps)
        self.attn = MultiHeadAttention(width, heads, kv_dim=width if cross else None)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_dim))
        self.mlp.add_module("act", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_dim, width))

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """A cross-attention block's keys/values of ``context`` (after its ``ln_1_kv``)."""
        return self.attn.project_kv(self.ln_1_kv(context))

    def forward(self, x: Tensor, bias: Tensor | None = None, cache=None, kv: tuple[Tensor, Tensor] | None = None,
                impl=None) -> Tensor:
        """Self-attention (``bias``, ``cache`` as ``MultiHeadAttention``), or with ``kv`` from
        ``project_kv`` cross-attention."""
        x = x + self.attn(self.ln_1(x), bias=bias, cache=cache, kv=kv, impl=impl)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """``forward(images [B, 3, S, S]) -> [B, 1 + N, width]`` tokens after ln_post, class token first.
    ``final_norm=False``: no ln_post (open_clip's CoCa normalises after its pooler instead)."""

    def __init__(self, cfg: VisionConfig, final_norm: bool = True):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.num_patches + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList([ResidualBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)
                                     for _ in range(cfg.layers)])
        self.ln_post = LayerNorm(cfg.width, eps=cfg.ln_eps) if final_norm else nn.Identity()
        self.grad_checkpointing = 0  # the first N blocks recompute their forward in backward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # CLIP's initialisation (open_clip VisionTransformer / OpenAI model.py).
        w, L = self.cfg.width, self.cfg.layers
        scale = w ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * L) ** -0.5, (2 * w) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, images: Tensor, patch_dropout: float = 0.0) -> Tensor:
        """``patch_dropout`` p > 0 (training, FLIP): each image keeps a random ``round(N * (1 - p))``
        of its N patch tokens (at least one, drawn from torch's generator on the images' device, so a
        run's seed and checkpointed RNG state fix them), and the class token always; the output
        then has ``1 + kept`` tokens."""
        x = self.conv1(images)                               # [B, width, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)                     # [B, N, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if patch_dropout > 0:
            x = drop_patches(x, patch_dropout)
        x = self.ln_pre(x)
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if i < self.grad_checkpointing and self.training else block(x)
        return self.ln_post(x)


def drop_patches(x: Tensor, ratio: float) -> Tensor:
    """x: [B, 1 + N, W] (class token first) -> [B, 1 + kept, W], each image its own random patches."""
    B, n = x.shape[0], x.shape[1] - 1
    kept = max(1, round(n * (1.0 - ratio)))
    order = torch.rand(B, n, device=x.device).argsort(dim=1)[:, :kept] + 1  # +1: past the class token
    patches = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to a token sequence (CoCa, Yu et al. 2022, Sec. 3.2).

    ``forward(x [B, N, context_dim]) -> [B, n_queries, dim]``.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim) * dim ** -0.5)
        self.ln_q = LayerNorm(dim)
        self.ln_k = LayerNorm(context_dim)
        self.attn = MultiHeadAttention(dim, heads, kv_dim=context_dim)

    def forward(self, x: Tensor) -> Tensor:
        q = self.ln_q(self.query).to(x.dtype).expand(x.shape[0], -1, -1)
        return self.attn(q, self.ln_k(x))
