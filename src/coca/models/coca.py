"""CoCa: ViT image tower, cascaded attentional poolers, T5 text encoder and captioning decoder.

    image -> ViT -> [B, 1+N, Wv] -> generative pooler (n_gen_queries) -> ln_visual -> visual tokens [B, Q, D]
         visual tokens -> contrastive pooler (1 query) -> image_proj -> image_embed (L2-normalised)
    text -> T5 encoder -> mean over non-pad tokens -> text_proj -> text_embed (L2-normalised)
    shift_right(text) -> T5 decoder (causal self-attn, cross-attn to visual tokens) -> LM head -> logits

The decoder sees only image tokens, never the text encoder's view of the same caption (which
would let it copy). The encoder and decoder share one token embedding, as in T5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CoCaConfig, ConfigError, get_preset
from ..errors import InputNotFound, UserError
from ..io import atomic_write_bytes, atomic_write_text
from .packing import TextPacking
from .t5 import T5Decoder, T5Encoder, init_t5_weights
from .vit import AttentionalPooler, LayerNorm, VisionTransformer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"


class CoCaBase(nn.Module):
    """What both model families share: input checks, the image embedding, generation, scoring,
    the temperature and ``save_pretrained``. A family defines the towers (``encode_image_tokens``,
    ``encode_text``, ``forward``) and a ``text_decoder`` with the decoding interface generation
    and scoring use (``new_cache``, ``cross_kv``, ``forward`` with a cache, ``static_step``,
    ``lm_head``)."""

    cfg: CoCaConfig
    tokenizer = None  # set by coca.load() when the directory has a tokenizer

    def towers(self) -> tuple[nn.Module, ...]:
        """The stacks ``set_grad_checkpointing`` reaches (each has ``blocks`` and ``grad_checkpointing``)."""
        return self.visual, self.text_encoder, self.text_decoder

    def set_grad_checkpointing(self, blocks: bool | int = True) -> None:
        """Recompute blocks in the backward pass instead of keeping their activations: ``True`` every
        block, ``False`` / 0 none, ``N`` the first N blocks of each stack (ViT, text encoder, decoder)."""
        for tower in self.towers():
            tower.grad_checkpointing = len(tower.blocks) if blocks is True else int(blocks)

    # --- input checks: a clear message instead of an index error deep inside a kernel -------
    def check_images(self, images: Tensor) -> None:
        s = self.cfg.vision.image_size
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape [B, 3, {s}, {s}], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"images must have shape [B, 3, {s}, {s}] for {self.cfg.name}, got {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised pixels), got {images.dtype}; "
                            "convert uint8 images with the model's preprocessing transform")

    def check_tokens(self, tokens: Tensor, name: str = "text tokens", values: bool = True) -> None:
        """Shape, dtype and length; with ``values`` also the id range, which reads the tokens on the
        host (a device sync): done at user-facing entry points (``encode_text``, generation), not
        in ``forward``, which the training step calls on tokenizer output."""
        t = self.cfg.text
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            shape = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"{name} must be a LongTensor of shape [B, L], got {shape}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be integer ids (torch.long), got {tokens.dtype}")
        if tokens.shape[1] > t.context_length:
            raise ValueError(f"{name} have length {tokens.shape[1]} > context_length {t.context_length}")
        if values and tokens.numel() and tokens.device.type != "meta":
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= t.vocab_size:
                raise ValueError(f"{name} contain id {lo if lo < 0 else hi} outside the vocabulary [0, {t.vocab_size})")

    def encode_image(self, images: Tensor, patch_dropout: float = 0.0) -> Tensor:
        return self.encode_image_tokens(images, patch_dropout)[0]

    def shift_right(self, tokens: Tensor) -> Tensor:
        """Teacher-forcing decoder inputs: [start, t0, ..., t_{L-2}] (start = pad in T5)."""
        start = torch.full_like(tokens[:, :1], self.cfg.text.start_id)
        return torch.cat([start, tokens[:, :-1]], dim=1)

    def contrastive_scale(self) -> Tensor:
        """The inverse temperature exp(logit_scale), clamped at ``max_logit_scale`` (CLIP's 100)."""
        return self.logit_scale.float().exp().clamp(max=self.cfg.max_logit_scale)

    @torch.no_grad()
    def generate(self, images: Tensor, config=None, **kwargs) -> Tensor:
        """Caption ids [B, T] (no start token; EOS then pad after the end), decoded as ``config`` (a
        ``GenerationConfig``) and keyword options say. See ``coca.generation``."""
        from ..generation import generate
        return generate(self, images, config, **kwargs)

    @torch.no_grad()
    def score(self, images: Tensor, tokens: Tensor, pairwise: bool = False, batch_size: int = 64):
        """Caption log-likelihoods (sum and mean over tokens); see ``coca.scoring``."""
        from ..scoring import score
        return score(self, images, tokens, pairwise=pairwise, batch_size=batch_size)

    # --- persistence -------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str | None = None,
                    token: str | None = None) -> str:
        """Save this model (with its tokenizer) and upload it to the Hub repository ``repo_id`` with
        a model card; ``coca.load("hf-hub:" + repo_id)`` loads it back. Returns the commit URL."""
        from ..hub import push_model
        return push_model(self, repo_id, private=private, commit_message=commit_message, token=token)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> Path:
        """Write config.json, model.safetensors (and tokenizer.model) atomically into ``path``."""
        from safetensors.torch import save as save_safetensors
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in unique_state(self).items()}
        atomic_write_bytes(path / WEIGHTS_FILE, save_safetensors(tensors, metadata={"format": "pt"}))
        atomic_write_text(path / CONFIG_FILE, json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is not None:  # tokenizer.model (SentencePiece) or CLIP's merges file
            atomic_write_bytes(path / tokenizer.file_name, tokenizer.serialized_model())
        return path


class CoCa(CoCaBase):
    def __init__(self, cfg: CoCaConfig):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        self.visual = VisionTransformer(v)
        self.gen_pooler = AttentionalPooler(t.d_model, v.width, cfg.pooler_heads, cfg.n_gen_queries)
        self.ln_visual = LayerNorm(t.d_model)
        self.contrastive_pooler = AttentionalPooler(t.d_model, t.d_model, cfg.pooler_heads, 1)
        self.image_proj = nn.Linear(t.d_model, cfg.embed_dim, bias=False)
        token_embedding = nn.Embedding(t.vocab_size, t.d_model)
        self.text_encoder = T5Encoder(t, token_embedding)
        self.text_decoder = T5Decoder(t, token_embedding)
        self.text_proj = nn.Linear(t.d_model, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.reset_parameters()

    # --- construction helpers --------------------------------------------------------------
    def reset_parameters(self) -> None:
        if self.logit_scale.is_meta:
            return
        init_t5_weights(self, self.cfg.text)
        nn.init.normal_(self.text_encoder.embed_tokens.weight, std=1.0)  # T5: unit-variance embeddings
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    def tie_weights(self) -> None:
        """Encoder and decoder share the token embedding (broken by ``to_empty``; restored here)."""
        self.text_decoder.embed_tokens = self.text_encoder.embed_tokens

    # --- towers ------------------------------------------------------------------------------
    def encode_image_tokens(self, images: Tensor, patch_dropout: float = 0.0) -> tuple[Tensor, Tensor]:
        """Returns (image_embed [B, E] normalised, visual tokens [B, Q, D] for the decoder).
        ``patch_dropout``: the share of patch tokens each image drops (training only; see the ViT)."""
        self.check_images(images)
        visual_tokens = self.ln_visual(self.gen_pooler(self.visual(images, patch_dropout)))
        pooled = self.contrastive_pooler(visual_tokens)[:, 0]
        return F.normalize(self.image_proj(pooled), dim=-1), visual_tokens

    def encode_text(self, tokens: Tensor, check_ids: bool = True, pack_text: bool | TextPacking = False) -> Tensor:
        """Mean of the encoder states over non-pad tokens, projected and L2-normalised: [B, E].
        ``check_ids=False`` skips the id-range check (a device sync) for trusted tokenizer output;
        ``pack_text`` runs the encoder on the real tokens only (right-padded tokens; same result),
        or with the given ``TextPacking`` of ``tokens``."""
        self.check_tokens(tokens, values=check_ids)
        return self._text_embed(tokens, packing=self._packing(tokens, pack_text))

    def _packing(self, tokens: Tensor, pack_text: bool | TextPacking) -> TextPacking | None:
        """The ``pack_text`` argument as a packing of ``tokens``: given, built here, or none."""
        if isinstance(pack_text, TextPacking):
            return pack_text
        return TextPacking.of(tokens, self.cfg.text.pad_id) if pack_text else None

    def _text_embed(self, tokens: Tensor, inputs_embeds: Tensor | None = None, packing: TextPacking | None = None) -> Tensor:
        if packing is not None:
            pooled = packing.mean(self.text_encoder(tokens, inputs_embeds=inputs_embeds, packing=packing))
            return F.normalize(self.text_proj(pooled), dim=-1)
        mask = tokens != self.cfg.text.pad_id
        hidden = self.text_encoder(tokens, mask, inputs_embeds)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images: Tensor, text_tokens: Tensor, return_logits: bool = True,
                pack_text: bool | TextPacking = False, patch_dropout: float = 0.0) -> dict[str, Tensor]:
        """``logits[:, i]`` predicts ``text_tokens[:, i]`` (decoder inputs are shifted right).

        ``return_logits=False`` returns ``decoder_hidden`` [B, L, D] instead of the [B, L, V]
        logits, for a caption loss that applies the LM head in chunks. Token ids are not range-
        checked here (that needs a device sync): call ``check_tokens`` on untrusted input.

        Training options: ``pack_text`` computes both text towers on the real tokens of the
        right-padded ``text_tokens`` only (``coca.models.packing``): the logits or states are then
        [1, T, ...] over the packed positions and ``caption_targets`` [1, T] holds their targets.
        ``TextPacking.of(text_tokens, pad_id)`` may be passed instead of True: built outside a
        compiled model it keeps the host read of the lengths out of the graph.
        ``patch_dropout`` drops that share of each image's patch tokens (FLIP)."""
        self.check_tokens(text_tokens, values=False)
        image_embeds, visual_tokens = self.encode_image_tokens(images, patch_dropout)
        decoder_inputs = self.shift_right(text_tokens)
        packing = self._packing(text_tokens, pack_text)
        ids = [text_tokens, decoder_inputs] if packing is None else [packing.pack(text_tokens), packing.pack(decoder_inputs)]
        # One lookup for encoder and decoder inputs: the shared table then gets one dense
        # gradient in backward instead of two that must be allocated and summed.
        encoder_embeds, decoder_embeds = self.text_encoder.embed_tokens(torch.cat(ids)).chunk(2)
        text_embeds = self._text_embed(text_tokens, encoder_embeds, packing)
        decoded = self.text_decoder(decoder_inputs, visual_tokens, inputs_embeds=decoder_embeds,
                                    return_hidden=not return_logits, packing=packing)
        out = {"image_embeds": image_embeds, "text_embeds": text_embeds, "logit_scale": self.contrastive_scale()}
        if packing is not None:
            decoded, out["caption_targets"] = decoded[None], ids[0][None]
        out["logits" if return_logits else "decoder_hidden"] = decoded
        return out



def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers, each shared tensor once under its first name."""
    state = dict(model.named_parameters())
    state.update((n, b) for n, b in model.named_buffers())
    return state


def create_model(config: str | CoCaConfig | dict[str, Any] = "coca-tiny", device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> CoCa:
    """Build a CoCa model from a preset name, a ``CoCaConfig`` or a config dict.

    ``device="meta"`` allocates nothing (for parameter counts and FLOPs of the large preset).
    """
    if isinstance(config, str):
        cfg = get_preset(config)
    elif isinstance(config, dict):
        cfg = CoCaConfig.from_dict(config)
    elif isinstance(config, CoCaConfig):
        cfg = config
    else:
        raise TypeError(f"config must be a preset name, CoCaConfig or dict, got {type(config).__name__}")
    with torch.device(device):
        model = model_class(cfg)(cfg)
    if dtype is not None:
        model.to(dtype)
    return model


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> CoCa:
    """Load a directory written by ``save_pretrained``, or ``hf-hub:ORG/NAME[@REVISION]`` from the
    Hugging Face Hub (through its cache; ``coca.hub``). Only safetensors are read: no pickle.

    ``dtype``: "fp32" | "bf16" | "int8" (dynamic quantisation of the Linear layers, CPU only; see
    ``coca.precision``) or a torch float dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..hub import model_dir
    path = model_dir(path)  # a directory, or an hf-hub:ORG/NAME snapshot in the Hugging Face cache
    if not path.is_dir():
        raise InputNotFound(f"model directory {str(path)!r} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise InputNotFound(f"{path / name} is missing: a model directory needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (write one with model.save_pretrained(dir) or `coca init`)")
    try:
        cfg = CoCaConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise ConfigError(f"{path / CONFIG_FILE}: {e}") from None
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    try:
        state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    load_checked(model, state, source=str(path / WEIGHTS_FILE))
    if dtype is not None:
        if isinstance(dtype, torch.dtype) and dtype not in (torch.float32, torch.bfloat16):
            model.to(dtype)  # e.g. float16 for a caller who knows their device
        else:
            from ..precision import apply_precision
            apply_precision(model, dtype, device)
    model.tokenizer = load_tokenizer(path, cfg)
    if model.tokenizer is not None:
        if model.tokenizer.vocab_size > cfg.text.vocab_size:  # its top ids would index past the embedding
            raise UserError(f"{model.tokenizer.path} has {model.tokenizer.vocab_size} ids but the model's "
                             f"vocabulary ({path / CONFIG_FILE} text.vocab_size) is {cfg.text.vocab_size}")
    return model.eval()


def model_class(cfg: CoCaConfig) -> type[CoCaBase]:
    """The module class of a config's model family."""
    if cfg.family == "open_clip":
        from .open_clip_coca import OpenCLIPCoCa
        return OpenCLIPCoCa
    return CoCa


def load_tokenizer(path: Path, cfg: CoCaConfig):
    """The tokenizer a model directory holds: tokenizer.model (SentencePiece), CLIP's merges file
    (the open_clip family), or None."""
    if (path / TOKENIZER_FILE).is_file():
        from ..tokenizer import Tokenizer
        return Tokenizer(path / TOKENIZER_FILE, context_length=cfg.text.context_length)
    from ..clip_tokenizer import VOCAB_FILE, CLIPTokenizer
    if (path / VOCAB_FILE).is_file():
        return CLIPTokenizer(path / VOCAB_FILE, context_length=cfg.text.context_length)
    return None


def load_checked(model: nn.Module, state: dict[str, Tensor], source: str, allow_missing: bool = False) -> None:
    """Copy ``state`` into ``model`` after checking every name and shape; errors list what differs."""
    expected = unique_state(model)
    problems = []
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing and not allow_missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(f"{name} has shape {tuple(tensor.shape)} but the config expects {tuple(expected[name].shape)}")
    if problems:
        raise UserError(f"{source} does not match the model config: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
