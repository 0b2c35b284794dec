"""Import weights from Hugging Face T5 (v1.1 / Flan-T5) and CLIP / open_clip ViT checkpoints.

Nothing here downloads: it reads models already in memory or files on local disk. Checkpoint
files are read as safetensors, or as PyTorch state dicts with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import CoCaConfig, ConfigError, TextConfig, VisionConfig, get_preset
from .errors import InputNotFound, UserError
from .models.coca import CoCa, create_model, load_checked
from .models.t5 import T5Decoder, T5Encoder
from .models.vit import VisionTransformer

# ---------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------


def text_config_from_hf(hf_config: dict, context_length: int = 77) -> TextConfig:
    """Our TextConfig from a HF ``T5Config`` (object or dict). Only T5 v1.1-style models fit."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    ff = c.get("feed_forward_proj", "relu")
    if ff != "gated-gelu":
        raise ConfigError(f"T5 checkpoint uses feed_forward_proj={ff!r}; coca's text branch is T5 v1.1 "
                          "(gated-gelu), as in google/t5-v1_1-* and google/flan-t5-*")
    if c.get("tie_word_embeddings", True):
        raise ConfigError("T5 checkpoint ties its LM head to the embedding (original T5); coca expects an "
                          "untied head as in T5 v1.1 / Flan-T5")
    return TextConfig(
        vocab_size=c["vocab_size"], context_length=context_length, d_model=c["d_model"], d_kv=c["d_kv"],
        num_heads=c["num_heads"], d_ff=c["d_ff"], encoder_layers=c["num_layers"],
        decoder_layers=c.get("num_decoder_layers") or c["num_layers"],
        relative_buckets=c.get("relative_attention_num_buckets", 32),
        relative_max_distance=c.get("relative_attention_max_distance", 128),
        ln_eps=c.get("layer_norm_epsilon", 1e-6), dropout=0.0,
        pad_id=c.get("pad_token_id", 0), eos_id=c.get("eos_token_id", 1))


def t5_state_from_hf(sd: dict[str, Tensor], cfg: TextConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """HF T5 state dict -> (encoder state, decoder state) in our names. q/k/v are fused."""
    def get(name):
        if name not in sd:
            raise KeyError(f"T5 checkpoint lacks {name!r}; is it a T5ForConditionalGeneration state dict?")
        return sd[name]

    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if shared is None:
        raise KeyError("T5 checkpoint has neither 'shared.weight' nor 'encoder.embed_tokens.weight'")
    enc = {"embed_tokens.weight": shared, "final_norm.weight": get("encoder.final_layer_norm.weight"),
           "position_bias.embedding.weight": get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")}
    dec = {"embed_tokens.weight": shared, "final_norm.weight": get("decoder.final_layer_norm.weight"),
           "position_bias.embedding.weight": get("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
           "lm_head.weight": get("lm_head.weight")}

    def self_attn(out, src, dst):
        a = f"{src}.SelfAttention"
        out[f"{dst}.self_attn.qkv.weight"] = torch.cat([get(f"{a}.q.weight"), get(f"{a}.k.weight"), get(f"{a}.v.weight")])
        out[f"{dst}.self_attn.o.weight"] = get(f"{a}.o.weight")
        out[f"{dst}.ln_self.weight"] = get(f"{src}.layer_norm.weight")

    def ffn(out, src, dst):
        for w in ("wi_0", "wi_1", "wo"):
            out[f"{dst}.ff.{w}.weight"] = get(f"{src}.DenseReluDense.{w}.weight")
        out[f"{dst}.ln_ff.weight"] = get(f"{src}.layer_norm.weight")

    for i in range(cfg.encoder_layers):
        self_attn(enc, f"encoder.block.{i}.layer.0", f"blocks.{i}")
        ffn(enc, f"encoder.block.{i}.layer.1", f"blocks.{i}")
    for i in range(cfg.decoder_layers):
        self_attn(dec, f"decoder.block.{i}.layer.0", f"blocks.{i}")
        x = f"decoder.block.{i}.layer.1"
        dec[f"blocks.{i}.cross_attn.q.weight"] = get(f"{x}.EncDecAttention.q.weight")
        dec[f"blocks.{i}.cross_attn.kv.weight"] = torch.cat([get(f"{x}.EncDecAttention.k.weight"),
                                                             get(f"{x}.EncDecAttention.v.weight")])
        dec[f"blocks.{i}.cross_attn.o.weight"] = get(f"{x}.EncDecAttention.o.weight")
        dec[f"blocks.{i}.ln_cross.weight"] = get(f"{x}.layer_norm.weight")
        ffn(dec, f"decoder.block.{i}.layer.2", f"blocks.{i}")
    return enc, dec


def from_hf_t5(hf_model, context_length: int = 77) -> tuple[T5Encoder, T5Decoder]:
    """Our (text_encoder, text_decoder), sharing one embedding, with a HF T5 model's weights."""
    cfg = text_config_from_hf(hf_model.config, context_length)
    enc_state, dec_state = t5_state_from_hf(hf_model.state_dict(), cfg)
    embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
    encoder, decoder = T5Encoder(cfg, embedding), T5Decoder(cfg, embedding)
    load_checked(encoder, enc_state, "HF T5 encoder")
    load_checked(decoder, dec_state, "HF T5 decoder")
    return encoder.eval(), decoder.eval()


def read_hf_t5_dir(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config dict, state dict) of a HF T5 directory: config.json plus model.safetensors, a sharded
    safetensors index, or pytorch_model.bin (read with weights_only=True)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputNotFound(f"{cfg_file} not found: --t5 expects a Hugging Face T5 directory "
                                "(config.json + model.safetensors or pytorch_model.bin)")
    hf_cfg = json.loads(cfg_file.read_text())
    if (path / "model.safetensors").is_file():
        state = read_state_file(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_state_file(path / shard))
    elif (path / "pytorch_model.bin").is_file():
        state = read_state_file(path / "pytorch_model.bin")
    else:
        raise InputNotFound(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json "
                                "or pytorch_model.bin")
    return hf_cfg, state


def read_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from safetensors, or from a torch file loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"checkpoint file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} could not be read as a state dict with weights_only=True ({e}). "
                         "Convert it to safetensors, e.g. via open_clip: "
                         "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------


def visual_state_only(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept a full CLIP/open_clip state dict ('visual.' prefix) or a visual-tower one."""
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def vision_config_from_clip(sd: dict[str, Tensor], heads: int | None = None, act: str = "gelu",
                            ln_eps: float = 1e-5) -> VisionConfig:
    """Infer the ViT shape from a CLIP visual state dict. CLIP uses 64-dim heads unless told."""
    if "conv1.weight" not in sd or "transformer.resblocks.0.attn.in_proj_weight" not in sd:
        raise KeyError("not a CLIP/open_clip ViT state dict (expected 'conv1.weight' and "
                       "'transformer.resblocks.N.attn.in_proj_weight')")
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    return VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                        heads=heads or width // 64, mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                        act=act, ln_eps=ln_eps)


def vit_state_from_clip(sd: dict[str, Tensor], cfg: VisionConfig, final_norm: bool = True) -> dict[str, Tensor]:
    """A CLIP / open_clip visual state dict in our ViT's names (``final_norm=False``: without
    ``ln_post``, which open_clip's CoCa applies after its pooler)."""
    out = {k: sd[k] for k in ("conv1.weight", "class_embedding", "positional_embedding")}
    for ln in ("ln_pre", "ln_post") if final_norm else ("ln_pre",):
        out[f"{ln}.weight"], out[f"{ln}.bias"] = sd[f"{ln}.weight"], sd[f"{ln}.bias"]
    for i in range(cfg.layers):
        out.update(clip_block_state(sd, f"transformer.resblocks.{i}", f"blocks.{i}"))
    return out


def clip_block_state(sd: dict[str, Tensor], source: str, target: str, cross: bool = False) -> dict[str, Tensor]:
    """One open_clip ``ResidualAttentionBlock`` in our ``ResidualBlock``'s names: its fused
    ``in_proj`` is our ``qkv``, or for a cross-attention block our ``q`` and ``kv`` (its first third
    and the rest), and its ``out_proj`` our ``out``."""
    out = {}
    lns = ("ln_1", "ln_1_kv", "ln_2") if cross else ("ln_1", "ln_2")
    for a, b in {**{n: n for n in lns}, "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj", "attn.out_proj": "attn.out"}.items():
        out[f"{target}.{b}.weight"], out[f"{target}.{b}.bias"] = sd[f"{source}.{a}.weight"], sd[f"{source}.{a}.bias"]
    weight, bias = sd[f"{source}.attn.in_proj_weight"], sd[f"{source}.attn.in_proj_bias"]
    if cross:
        width = weight.shape[1]
        out[f"{target}.attn.q.weight"], out[f"{target}.attn.q.bias"] = weight[:width], bias[:width]
        out[f"{target}.attn.kv.weight"], out[f"{target}.attn.kv.bias"] = weight[width:], bias[width:]
    else:
        out[f"{target}.attn.qkv.weight"], out[f"{target}.attn.qkv.bias"] = weight, bias
    return out


def from_open_clip_vit(visual: nn.Module) -> VisionTransformer:
    """Our ViT with the weights of an open_clip ``VisionTransformer`` (e.g. ``model.visual``)."""
    sd = visual.state_dict()
    block = visual.transformer.resblocks[0]
    # open_clip names the activation module "gelu" whichever it is; its QuickGELU is its own class.
    act = "quick_gelu" if type(getattr(block.mlp, "gelu", None)).__name__ == "QuickGELU" else "gelu"
    cfg = vision_config_from_clip(sd, heads=block.attn.num_heads, act=act, ln_eps=visual.ln_pre.eps)
    vit = VisionTransformer(cfg)
    load_checked(vit, vit_state_from_clip(sd, cfg), "open_clip ViT")
    return vit.eval()


# ---------------------------------------------------------------------------------------------
# A CoCa model from a T5 directory and a CLIP ViT file (`coca init`)
# ---------------------------------------------------------------------------------------------


def init_from_pretrained(preset: str | CoCaConfig = "coca-large-v2", t5_dir: str | None = None,
                         vit_file: str | None = None, vit_act: str = "gelu") -> CoCa:
    """A CoCa model whose text branch and/or vision tower come from local checkpoints; poolers,
    projections and temperature keep their fresh initialisation."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    cfg.vision.act = vit_act
    model = create_model(cfg)
    if t5_dir is not None:
        hf_cfg, state = read_hf_t5_dir(t5_dir)
        t5_cfg = text_config_from_hf(hf_cfg, cfg.text.context_length)
        shapes = ("d_model", "d_kv", "num_heads", "d_ff", "encoder_layers", "decoder_layers",
                  "relative_buckets", "relative_max_distance")
        diff = [f"{k}={getattr(t5_cfg, k)} (preset {getattr(cfg.text, k)})" for k in shapes
                if getattr(t5_cfg, k) != getattr(cfg.text, k)]
        if diff:
            raise ConfigError(f"T5 checkpoint in {t5_dir} does not fit preset {cfg.name}: " + ", ".join(diff))
        if t5_cfg.vocab_size < cfg.text.vocab_size:
            raise ConfigError(f"T5 checkpoint vocabulary {t5_cfg.vocab_size} < preset vocabulary {cfg.text.vocab_size}")
        enc, dec = t5_state_from_hf(state, t5_cfg)
        # HF pads T5's 32,000 SentencePiece pieces to 32,128 rows; the extra rows are never produced
        # by the tokenizer, so they are dropped to keep the preset's vocabulary.
        V = cfg.text.vocab_size
        for s in (enc, dec):
            for k in ("embed_tokens.weight", "lm_head.weight"):
                if k in s:
                    s[k] = s[k][:V]
        load_checked(model.text_encoder, enc, f"{t5_dir} (encoder)")
        load_checked(model.text_decoder, dec, f"{t5_dir} (decoder)")
        spiece = Path(t5_dir) / "spiece.model"
        if spiece.is_file():
            from .tokenizer import Tokenizer
            tok = Tokenizer(spiece, cfg.text.context_length)
            if tok.vocab_size > V:
                raise ConfigError(f"{spiece} has {tok.vocab_size} ids > model vocabulary {V}")
            model.tokenizer = tok
    if vit_file is not None:
        sd = visual_state_only(read_state_file(vit_file))
        found = vision_config_from_clip(sd, heads=1, act=vit_act)  # head count is not in the weights
        for k in ("image_size", "patch_size", "width", "layers", "mlp_dim"):
            if getattr(found, k) != getattr(cfg.vision, k):
                raise ConfigError(f"ViT checkpoint {vit_file} has {k}={getattr(found, k)} but preset {cfg.name} "
                                  f"expects {getattr(cfg.vision, k)}")
        load_checked(model.visual, vit_state_from_clip(sd, cfg.vision), str(vit_file))
    return model


# ---------------------------------------------------------------------------------------------
# open_clip's CoCa checkpoints (`coca convert open-clip`)
# ---------------------------------------------------------------------------------------------

# open_clip's architecture names and our presets of them
OPEN_CLIP_ARCHS = {"coca_ViT-B-32": "openclip-coca-vit-b-32", "coca_ViT-L-14": "openclip-coca-vit-l-14"}
_OLD_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection", "cls_emb")


def open_clip_coca_state(sd: dict[str, Tensor], cfg: CoCaConfig) -> dict[str, Tensor]:
    """An open_clip ``CoCa`` state dict in the names of our ``OpenCLIPCoCa`` (the tensors unchanged
    but for transposed projections and split attention projections)."""
    if not any(k.startswith("text.") for k in sd):  # saved before open_clip's "custom text" layout
        sd = {("text." + k if k.startswith(_OLD_TEXT_KEYS) else k): v for k, v in sd.items()}
    for key in ("visual.attn_pool.query", "text.cls_emb", "text_decoder.text_projection"):
        if key not in sd:
            raise UserError(f"not an open_clip CoCa checkpoint: it has no {key!r} (found e.g. {sorted(sd)[:3]})")
    v, t, E = cfg.vision, cfg.text, cfg.embed_dim
    out = {f"visual.{k}": x for k, x in vit_state_from_clip(visual_state_only(sd), v, final_norm=False).items()}
    pool = "visual.attn_pool."
    bias = sd[pool + "attn.in_proj_bias"]
    if pool + "attn.in_proj_weight" in sd:  # the ViT is as wide as the pooler: torch keeps q, k, v fused
        q_weight, kv_weight = sd[pool + "attn.in_proj_weight"][:E], sd[pool + "attn.in_proj_weight"][E:]
    else:
        q_weight = sd[pool + "attn.q_proj_weight"]
        kv_weight = torch.cat([sd[pool + "attn.k_proj_weight"], sd[pool + "attn.v_proj_weight"]])
    out.update({
        "gen_pooler.query": sd[pool + "query"],
        "gen_pooler.attn.q.weight": q_weight, "gen_pooler.attn.q.bias": bias[:E],
        "gen_pooler.attn.kv.weight": kv_weight, "gen_pooler.attn.kv.bias": bias[E:],
        "image_proj.weight": sd["visual.proj"].t(),
        "text_encoder.embed_tokens.weight": sd["text.token_embedding.weight"],
        "text_encoder.positional_embedding": sd["text.positional_embedding"],
        "text_encoder.cls_emb": sd["text.cls_emb"],
        "text_proj.weight": sd["text.text_projection"].t(),
        "text_decoder.lm_head.weight": sd["text_decoder.text_projection"].t(),
        "logit_scale": sd["logit_scale"].reshape(()),
    })
    for ours, theirs in (("gen_pooler.attn.out", pool + "attn.out_proj"), ("gen_pooler.ln_q", pool + "ln_q"),
                         ("gen_pooler.ln_k", pool + "ln_k"), ("ln_visual", "visual.ln_post"),
                         ("text_encoder.ln_final", "text.ln_final"), ("text_decoder.final_norm", "text_decoder.ln_final")):
        out[f"{ours}.weight"], out[f"{ours}.bias"] = sd[f"{theirs}.weight"], sd[f"{theirs}.bias"]
    for i in range(t.encoder_layers):
        out.update(clip_block_state(sd, f"text.transformer.resblocks.{i}", f"text_encoder.blocks.{i}"))
    for i in range(t.decoder_layers):
        out.update(clip_block_state(sd, f"text_decoder.resblocks.{i}", f"text_decoder.self_blocks.{i}"))
        out.update(clip_block_state(sd, f"text_decoder.cross_attn.{i}", f"text_decoder.cross_blocks.{i}", cross=True))
    return {k: x.contiguous() for k, x in out.items()}


def open_clip_coca_config(arch: str | dict, name: str | None = None) -> CoCaConfig:
    """Our config of an open_clip CoCa architecture: a name in ``OPEN_CLIP_ARCHS`` (its preset) or
    an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``multimodal_cfg``)."""
    if isinstance(arch, str):
        if arch not in OPEN_CLIP_ARCHS:
            raise ConfigError(f"unknown open_clip CoCa architecture {arch!r}; known: {', '.join(OPEN_CLIP_ARCHS)}")
        return get_preset(OPEN_CLIP_ARCHS[arch])
    v, t, m = arch["vision_cfg"], arch["text_cfg"], arch["multimodal_cfg"]
    if (m["width"], m["heads"]) != (t["width"], t["heads"]) or m.get("vocab_size", 49408) != t.get("vocab_size", 49408):
        raise ConfigError("the open_clip family needs the multimodal decoder's width, heads and vocabulary "
                          "to equal the text tower's")
    width, heads, E = t["width"], t["heads"], arch["embed_dim"]
    vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"], layers=v["layers"],
                          heads=v["width"] // v.get("head_width", 64), mlp_dim=int(v["width"] * v.get("mlp_ratio", 4.0)),
                          act="quick_gelu" if arch.get("quick_gelu") else "gelu")
    text = TextConfig(vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77) - 1,
                      d_model=width, d_kv=width // heads, num_heads=heads, d_ff=int(width * t.get("mlp_ratio", 4.0)),
                      encoder_layers=t["layers"], decoder_layers=m["layers"], ln_eps=1e-5, pad_id=0,
                      eos_id=49407, decoder_start_id=49406)
    return CoCaConfig(name=name or "openclip-coca-custom", family="open_clip", vision=vision, text=text, embed_dim=E,
                      n_gen_queries=v.get("attn_pooler_queries", 256), pooler_heads=v.get("attn_pooler_heads", 8))


def from_open_clip_coca(sd: dict[str, Tensor], arch: str | dict, source: str = "open_clip CoCa", tokenizer=None):
    """Our ``OpenCLIPCoCa`` with the weights of an open_clip CoCa state dict; the tokenizer is
    CLIP's from the installed open_clip package unless given."""
    from .clip_tokenizer import CLIPTokenizer
    cfg = open_clip_coca_config(arch)
    model = create_model(cfg, device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    try:
        state = open_clip_coca_state(sd, cfg)
    except KeyError as e:
        raise UserError(f"{source} does not match the model config ({cfg.name}): it has no tensor {e}; "
                        "is the architecture right?") from None
    load_checked(model, state, source)
    model.tokenizer = tokenizer or CLIPTokenizer(context_length=cfg.text.context_length)
    return model.eval()


def infer_open_clip_arch(sd: dict[str, Tensor]) -> str:
    """Which published architecture a CoCa state dict has, from its tensor shapes."""
    for arch, preset in OPEN_CLIP_ARCHS.items():
        cfg = get_preset(preset)
        conv = sd.get("visual.conv1.weight")
        if conv is not None and tuple(conv.shape) == (cfg.vision.width, 3, cfg.vision.patch_size, cfg.vision.patch_size) \
                and sd.get("text.cls_emb") is not None and sd["text.cls_emb"].shape[0] == cfg.text.d_model:
            return arch
    raise UserError("the checkpoint is neither coca_ViT-B-32 nor coca_ViT-L-14 by its shapes; pass --arch "
                    "(or an open_clip_config.json beside it)")


def convert_open_clip(checkpoint: str, out: str | os.PathLike, arch: str | None = None,
                      vocab: str | None = None) -> tuple[Path, str]:
    """`coca convert open-clip`: an open_clip CoCa checkpoint (a file, a directory holding
    ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, or ``hf-hub:ORG/NAME``) saved
    in our layout at ``out``. The architecture is ``arch``, else the ``open_clip_config.json`` beside
    the weights, else read from the shapes. Returns (out, the architecture)."""
    from . import hub
    from .clip_tokenizer import CLIPTokenizer
    config_file = None
    if hub.is_hub(checkpoint):
        weights = hub.file(checkpoint, hub.OPEN_CLIP_WEIGHTS)
        try:
            config_file = hub.file(checkpoint, ("open_clip_config.json",))
        except InputNotFound:
            config_file = None
    else:
        weights = Path(checkpoint)
        if weights.is_dir():
            found = [weights / n for n in hub.OPEN_CLIP_WEIGHTS if (weights / n).is_file()]
            if not found:
                raise InputNotFound(f"{weights} holds none of {', '.join(hub.OPEN_CLIP_WEIGHTS)}")
            weights = found[0]
        config_file = weights.parent / "open_clip_config.json"
    state = {k.removeprefix("module."): v for k, v in read_state_file(weights).items()}
    spec: str | dict | None = arch
    if spec is None and config_file is not None and config_file.is_file():
        spec = json.loads(config_file.read_text()).get("model_cfg")
    if spec is None:
        spec = infer_open_clip_arch(state)
    tokenizer = CLIPTokenizer(vocab, context_length=open_clip_coca_config(spec).text.context_length)
    model = from_open_clip_coca(state, spec, source=str(weights), tokenizer=tokenizer)
    path = model.save_pretrained(out)
    return path, spec if isinstance(spec, str) else model.cfg.name
