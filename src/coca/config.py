"""Typed configuration for the model, and the one registry of named presets.

Every config is a plain dataclass so it round-trips through JSON/YAML. ``from_dict`` rejects
unknown keys and suggests the nearest valid one, so a typo in a run config fails at load time
instead of silently falling back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .components import COMPONENTS
from .errors import InputNotFound, UserError

# Images with more pixels are skipped (training, preparation) or refused (single images) as likely
# decompression bombs: PIL's own warning threshold (89.5M pixels, e.g. 9,459 x 9,459).
MAX_PIXELS = 89_478_485


class ConfigError(UserError):
    """A config value or key is invalid; the message names the key and what is expected."""


def _nearest(name: str, options: list[str]) -> str:
    lowered = {o.lower(): o for o in options}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean '{lowered[match[0]]}'?)" if match else ""


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are an error with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, names)}; valid keys: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    return obj


def _coerce(value, hint, path):
    """Accept ints for floats and check the basic type; anything else is a clear error."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):  # Optional[X], or X | Y of basic types
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        if len(args) > 1:
            if any(type(value) is a for a in args):
                return value
            raise ConfigError(f"config key '{path}' must be {' or '.join(a.__name__ for a in args)}, got {value!r}")
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and item is str:  # `--set optim.freeze=visual`: a list of one
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
        return [from_dict(item, v, f"{path}[{i}]") if dataclasses.is_dataclass(item) else _coerce(v, item, f"{path}[{i}]")
                for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{path}' must be {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):  # ".inf" and ".nan" are YAML floats; no setting wants one
        raise ConfigError(f"config key '{path}' must be a finite number, got {value!r}")
    return value


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass
class VisionConfig:
    """CLIP-compatible ViT (class token, learned positions, ln_pre, pre-LN blocks, ln_post)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    # OpenAI CLIP checkpoints use QuickGELU; LAION/open_clip ones mostly use exact GELU.
    act: str = "gelu"
    ln_eps: float = 1e-5

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "width", "layers", "heads", "mlp_dim")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"vision.width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ConfigError(f"vision.act must be 'gelu' or 'quick_gelu', got {self.act!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """T5 v1.1-shaped encoder-decoder: RMSNorm, relative position buckets, gated-GELU FFN."""

    vocab_size: int = 32000
    context_length: int = 77
    d_model: int = 1024
    d_kv: int = 64
    num_heads: int = 16
    d_ff: int = 2816
    encoder_layers: int = 24
    decoder_layers: int = 24
    relative_buckets: int = 32
    relative_max_distance: int = 128
    ln_eps: float = 1e-6
    dropout: float = 0.0
    pad_id: int = 0  # also the decoder start token, as in T5
    eos_id: int = 1
    decoder_start_id: int | None = None  # the decoder's start token; None: pad_id (T5). open_clip: <start_of_text>
    # open_clip family: which keys the CLS token's mask opens. "legacy" is what the released CoCa
    # weights were trained with (shifted one place: the first pad is seen, a full caption's last
    # token is not); "correct" opens exactly the real tokens and the CLS itself
    cls_mask: str = "legacy"

    def __post_init__(self):
        _positive(self, "vocab_size", "context_length", "d_model", "d_kv", "num_heads", "d_ff",
                  "encoder_layers", "decoder_layers", "relative_buckets", "relative_max_distance")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"text.dropout must be in [0, 1), got {self.dropout}")
        for key in ("pad_id", "eos_id", "start_id"):
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise ConfigError(f"text.{key} {getattr(self, key)} is outside the vocabulary [0, {self.vocab_size})")
        if self.cls_mask not in ("legacy", "correct"):
            raise ConfigError(f"text.cls_mask must be 'legacy' or 'correct', got {self.cls_mask!r}")

    @property
    def start_id(self) -> int:
        """The token every decoded sequence starts with."""
        return self.pad_id if self.decoder_start_id is None else self.decoder_start_id


# t5: our CoCa (T5 text encoder-decoder, two poolers); open_clip: open_clip's CoCa (CLIP text
# transformer with a CLS token, a multimodal decoder reading its token outputs, one pooler)
MODEL_FAMILIES = ("t5", "open_clip")


@dataclass
class CoCaConfig:
    name: str = "custom"
    family: str = "t5"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 768  # contrastive embedding size
    n_gen_queries: int = 256  # generative pooler queries = visual tokens the decoder attends to
    pooler_heads: int = 16
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = from_dict(TextConfig, self.text, "text")
        _positive(self, "embed_dim", "n_gen_queries", "pooler_heads")
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"family must be one of {MODEL_FAMILIES}, got {self.family!r}")
        if self.family == "open_clip" and self.embed_dim != self.text.d_model:
            raise ConfigError(f"the open_clip family's decoder reads the pooled image tokens: embed_dim "
                              f"({self.embed_dim}) must equal text.d_model ({self.text.d_model})")
        if self.family == "open_clip" and self.n_gen_queries < 2:
            raise ConfigError("the open_clip family splits its pooler's queries into the image embedding and "
                              f"the decoder's tokens: n_gen_queries must be >= 2, got {self.n_gen_queries}")
        pooled = self.embed_dim if self.family == "open_clip" else self.text.d_model
        if pooled % self.pooler_heads:
            raise ConfigError(f"the pooler's width {pooled} is not divisible by pooler_heads {self.pooler_heads}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoCaConfig":
        return from_dict(cls, data)


def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{n} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------------------------------------
# Preset registry: the only place model shapes are named.
# ---------------------------------------------------------------------------------------------

_PRESETS: dict[str, CoCaConfig] = {}


def register_preset(cfg: CoCaConfig) -> CoCaConfig:
    if cfg.name in _PRESETS:
        raise ConfigError(f"preset {cfg.name!r} is already registered")
    _PRESETS[cfg.name] = cfg
    return cfg


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> CoCaConfig:
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}{_nearest(name, list(_PRESETS))}; "
                          f"available: {', '.join(list_presets())}")
    return copy.deepcopy(_PRESETS[name])


# ViT-L/14 at 224px + T5-Large v1.1 shapes (the described system).
register_preset(CoCaConfig(
    name="coca-large-v2",
    vision=VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
    text=TextConfig(vocab_size=32000, d_model=1024, d_kv=64, num_heads=16, d_ff=2816,
                    encoder_layers=24, decoder_layers=24),
    embed_dim=768, n_gen_queries=256, pooler_heads=16,
))

# ViT-B/16 + T5-Base v1.1 shapes.
register_preset(CoCaConfig(
    name="coca-base",
    vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072),
    text=TextConfig(vocab_size=32000, d_model=768, d_kv=64, num_heads=12, d_ff=2048,
                    encoder_layers=12, decoder_layers=12),
    embed_dim=512, n_gen_queries=256, pooler_heads=12,
))

# open_clip's CoCa architectures, for its published weights (`coca convert open-clip`): CLIP ViT
# with one attentional pooler (256 queries: the first is the image embedding, the other 255 the
# decoder's visual tokens), CLIP's causal text transformer with a CLS token, a multimodal decoder.
# Tokens here exclude <start_of_text>, which the model prepends: 75 + 1 = open_clip's 76.
def _open_clip_coca(name: str, vision: VisionConfig, width: int, heads: int, embed_dim: int) -> CoCaConfig:
    return CoCaConfig(
        name=name, family="open_clip", vision=vision,
        text=TextConfig(vocab_size=49408, context_length=75, d_model=width, d_kv=width // heads, num_heads=heads,
                        d_ff=4 * width, encoder_layers=12, decoder_layers=12, ln_eps=1e-5, pad_id=0, eos_id=49407,
                        decoder_start_id=49406),
        embed_dim=embed_dim, n_gen_queries=256, pooler_heads=8, init_logit_scale=math.log(1 / 0.07))


register_preset(_open_clip_coca("openclip-coca-vit-b-32",
                                VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072),
                                width=512, heads=8, embed_dim=512))
register_preset(_open_clip_coca("openclip-coca-vit-l-14",
                                VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
                                width=768, heads=12, embed_dim=768))

# A few million parameters at 64px: every test and the demo use it. Patch 16 keeps the ViT at
# 16 tokens, which is what makes a CPU training step take a fraction of a second.
register_preset(CoCaConfig(
    name="coca-tiny",
    vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=4, heads=4, mlp_dim=512),
    text=TextConfig(vocab_size=1024, d_model=128, d_kv=32, num_heads=4, d_ff=512,
                    encoder_layers=3, decoder_layers=3),
    embed_dim=128, n_gen_queries=16, pooler_heads=4,
))


# ---------------------------------------------------------------------------------------------
# Run configuration: one typed tree per training run, saved as YAML in the run directory.
# ---------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Training augmentation (CoCa recipe: resize + random crop, horizontal flip, colour jitter)."""

    crop_scale_min: float = 0.9  # RandomResizedCrop area fraction lower bound (upper bound 1.0)
    flip_prob: float = 0.5       # a flipped image gets "left"/"right" swapped in its caption (flip_swap_words)
    flip_swap_words: str = "spatial"  # spatial: only directions ("left of", "on the right"); all; none
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02

    def __post_init__(self):
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"augment.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"augment.flip_prob must be in [0, 1], got {self.flip_prob}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augment.hue must be in [0, 0.5], got {self.hue}")
        if self.flip_swap_words not in ("spatial", "all", "none"):
            raise ConfigError(f"augment.flip_swap_words must be 'spatial', 'all' or 'none', got {self.flip_swap_words!r}")
        for k in ("brightness", "contrast", "saturation"):
            if getattr(self, k) < 0:
                raise ConfigError(f"augment.{k} must be >= 0, got {getattr(self, k)}")


DATA_KINDS = ("synthetic", "webdataset", "csv", "folder", "coco")
DEFAULT_PRESET = "coca-tiny"  # a run config without a model section trains the tiny preset


@dataclass
class DataConfig:
    kind: str = "synthetic"        # synthetic | webdataset | csv | folder | coco
    train: str = ""                # shard pattern ("data/{00000..00099}.tar"), CSV/TSV path, folder root, or
                                   # coco: a COCO captions file or Karpathy's dataset_coco.json
    val: str = ""                  # same kind as train; empty: no validation set (synthetic: built in)
    split: str = "train"           # coco with Karpathy's file: the training split(s), e.g. "train+restval"
    val_split: str = "val"         # coco with Karpathy's file: the split of data.val
    image_root: str = ""           # CSV / coco: base directory of relative image paths (default: the file's directory)
    image_column: str = "filepath"
    caption_column: str = "caption"
    templates: str = "a photo of a {}."  # folder: caption templates separated by "|"
    batch_size: int = 64           # per process
    workers: int = 1               # DataLoader worker processes
    shuffle_buffer: int = 1000     # webdataset sample shuffle buffer
    resampled: bool = False        # webdataset: draw shards with replacement per rank and worker (huge datasets)
    max_pixels: int = MAX_PIXELS   # larger images are skipped (decompression bombs)
    synthetic_train_size: int = 100_000
    synthetic_val_size: int = 512
    synthetic_seed: int = 0
    tokenizer: str = ""            # tokenizer.model path; empty: train one on the training captions
    tokenizer_vocab_size: int = 32000
    tokenizer_model_type: str = "unigram"  # unigram (as T5) or bpe
    tokenizer_train_captions: int = 200_000  # captions read to train a tokenizer
    # real tokens per caption (EOS included) the data averages: what packed text towers cost, for
    # `coca plan`; 22 is web alt-text's (median 15, a long tail, ~5% truncated at the limit)
    mean_caption_tokens: float = 22.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}{_nearest(self.kind, list(DATA_KINDS))}")
        if self.kind != "synthetic" and not self.train:
            raise ConfigError(f"data.train is required for data.kind={self.kind!r} (shards, CSV path or folder)")
        _positive(self, "batch_size", "max_pixels", "synthetic_train_size", "synthetic_val_size",
                  "tokenizer_vocab_size", "tokenizer_train_captions")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if isinstance(self.mean_caption_tokens, bool) or not isinstance(self.mean_caption_tokens, (int, float)) \
                or self.mean_caption_tokens < 1:
            raise ConfigError(f"data.mean_caption_tokens must be a number >= 1, got {self.mean_caption_tokens!r}")
        if self.tokenizer_model_type not in ("unigram", "bpe"):
            raise ConfigError(f"data.tokenizer_model_type must be 'unigram' or 'bpe', got {self.tokenizer_model_type!r}")
        if isinstance(self.augment, dict):
            self.augment = from_dict(AugmentConfig, self.augment, "data.augment")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01     # not applied to norms, biases, embeddings, queries, temperature
    warmup_frac: float = 0.1       # linear warm-up over this fraction of train.steps, then cosine
    min_lr_ratio: float = 0.0      # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0         # max global gradient norm; 0 disables
    # Components as `coca info` names them: visual, poolers, text_encoder, text_decoder,
    # token_embedding, lm_head, projections, temperature.
    freeze: list[str] = field(default_factory=list)        # no gradient, not in the optimiser
    lr_mult: dict[str, float] = field(default_factory=dict)  # e.g. {visual: 0.1}: that component at 0.1 x lr
    layer_decay: float = 1.0       # < 1: block i of an N-block tower gets layer_decay ** (N - i) (BEiT-style)

    def __post_init__(self):
        names = list(COMPONENTS)
        for key, where in [(c, "optim.freeze") for c in self.freeze] + [(c, "optim.lr_mult") for c in self.lr_mult]:
            if key not in names:
                raise ConfigError(f"{where}: unknown component {key!r}{_nearest(key, names)}; components: {', '.join(names)}")
        if len(set(self.freeze)) == len(names):
            raise ConfigError("optim.freeze lists every component: nothing would be trained")
        for key, mult in self.lr_mult.items():
            if not mult > 0:
                raise ConfigError(f"optim.lr_mult.{key} must be > 0, got {mult} (to stop training a component, "
                                  f"put it in optim.freeze)")
            if key in self.freeze:
                raise ConfigError(f"optim.lr_mult.{key}: {key} is also in optim.freeze")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"optim.{k} must be in [0, 1), got {getattr(self, k)}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"optim.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")


@dataclass
class LossConfig:
    contrastive_weight: float = 1.0  # the description weights both objectives equally
    caption_weight: float = 1.0
    # > 0: the caption cross-entropy applies the LM head to this many positions at a time and
    # recomputes each chunk in backward, so [tokens, vocab] float32 logits never exist whole
    caption_chunk_tokens: int = 0

    def __post_init__(self):
        if self.caption_chunk_tokens < 0:
            raise ConfigError(f"loss.caption_chunk_tokens must be >= 0, got {self.caption_chunk_tokens}")
        if self.contrastive_weight < 0 or self.caption_weight < 0 or self.contrastive_weight + self.caption_weight == 0:
            raise ConfigError("loss weights must be >= 0 and not both 0")


EVAL_TASKS = ("zeroshot", "caption", "retrieval")
# decoding strategies (coca.generation); a captioning evaluation is deterministic: no sampling
# open_clip_beam: open_clip's CoCa beam search (raw-logit scores), for the captions open_clip gives
Strategy = Literal["greedy", "beam", "sample", "open_clip_beam"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
EVAL_STRATEGIES: tuple[str, ...] = tuple(s for s in STRATEGIES if s != "sample")
# zero-shot classification (coca.evaluate.zeroshot): class embeddings, caption likelihood, or both
ZeroShotMethod = Literal["contrastive", "likelihood", "both"]
ZEROSHOT_METHODS: tuple[str, ...] = typing.get_args(ZeroShotMethod)
# what each evaluation reports, i.e. what train.best_metric may name after "<eval name>."
EVAL_METRICS = {
    "zeroshot": ("top1", "top5", "mean_per_class_top1"),
    "caption": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "exact_match"),
    "retrieval": ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall"),
}


@dataclass
class EvalConfig:
    """One evaluation: the task and inputs of a `coca eval` command (same defaults)."""

    task: str = ""                 # zeroshot | caption | retrieval
    name: str = ""                 # metric prefix in metrics.jsonl (default: the task)
    images: str = ""               # image folder (zeroshot: one sub-folder per class, or with labels_file)
    annotations: str = ""          # caption / retrieval: COCO captions, Karpathy's dataset_coco.json, or a list
    split: str = "test"            # Karpathy split(s), e.g. "val" or "train+restval"
    limit: int = 0                 # only the first N images (0: all)
    classnames: str = ""           # zeroshot: class names file
    templates: str = ""            # zeroshot: prompt templates file (default: CLIP's 80)
    dataset: str = "folder"        # zeroshot: folder | imagenet (the shipped 1,000 class names)
    labels_file: str = ""          # zeroshot: CSV/TSV of image,label instead of class folders
    method: str = "contrastive"    # zeroshot: contrastive | likelihood | both (+ their ensemble)
    strategy: str = "beam"         # caption: beam | greedy
    num_beams: int = 3
    max_new_tokens: int = 30
    compile: bool = False          # caption: decode through the torch.compile'd step (coca eval caption --compile)
    spice: bool = False            # caption: SPICE is slow and needs Stanford CoreNLP
    batch_size: int = 0            # 0: 32 for caption, 64 otherwise (as `coca eval`)
    workers: int = 2               # image decoding processes

    def __post_init__(self):
        if self.task not in EVAL_TASKS:
            raise ConfigError(f"eval task must be one of {EVAL_TASKS}, got {self.task!r}{_nearest(self.task, list(EVAL_TASKS))}")
        self.name = self.name or self.task
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"eval name {self.name!r} must be letters, digits, '_' or '-' (it prefixes metric names)")
        if not self.images:
            raise ConfigError(f"eval {self.name}: 'images' (an image folder) is required")
        if self.task in ("caption", "retrieval") and not self.annotations:
            raise ConfigError(f"eval {self.name}: 'annotations' (a captions file) is required for {self.task}")
        if self.method not in ZEROSHOT_METHODS:
            raise ConfigError(f"eval {self.name}: method must be one of {ZEROSHOT_METHODS}, got {self.method!r}")
        if self.dataset not in ("folder", "imagenet"):
            raise ConfigError(f"eval {self.name}: dataset must be 'folder' or 'imagenet', got {self.dataset!r}")
        if self.strategy not in EVAL_STRATEGIES:
            raise ConfigError(f"eval {self.name}: strategy must be one of {EVAL_STRATEGIES}, got {self.strategy!r}")
        _positive(self, "num_beams", "max_new_tokens")
        if self.limit < 0 or self.batch_size < 0 or self.workers < 0:
            raise ConfigError(f"eval {self.name}: limit, batch_size and workers must be >= 0")
        if not self.batch_size:
            self.batch_size = 32 if self.task == "caption" else 64


# training engines (coca.train.engines): one process, PyTorch DDP, DeepSpeed ZeRO
EngineName = Literal["single", "ddp", "deepspeed"]
ENGINES: tuple[str, ...] = typing.get_args(EngineName)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000               # 0 with init_from: export the loaded model as RUN_DIR/model
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    val_every: int = 500            # 0 disables periodic validation
    val_batches: int = 8
    precision: str = "bf16"         # bf16 autocast with fp32 master weights, fp32, or auto: bf16 on a GPU or a CPU
                                    # with bf16 matmul instructions (AMX, AVX512-BF16), fp32 on other CPUs
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 0
    threads: int = 0                # CPU threads for torch; 0 leaves torch's default
    tensorboard: bool = True
    progress: bool = True
    engine: str = "single"          # single | ddp | deepspeed (ddp/deepspeed: launch with torchrun or deepspeed)
    accum_steps: int = 1            # micro-batches per step; >1 keeps the global contrastive batch (GradCache)
    zero_stage: int = 2             # DeepSpeed ZeRO stage for the generated config
    deepspeed_config: str = ""      # a DeepSpeed JSON of your own instead of the generated one
    # recompute blocks in backward instead of keeping their activations: true (every block), false,
    # or N (the first N blocks of each stack); `coca plan` reports the fewest that fit
    activation_checkpointing: bool | int = False
    compile: bool = False           # torch.compile the model for the training forward/backward
    pack_text: bool = True          # text towers on the real tokens only (exact: the same loss and gradients)
    # packed attention kernel: groups (re-padded per caption, 4 length groups on CPUs), flex
    # (FlexAttention with document masks; GPUs only, no backward on CPUs), auto (groups until
    # flex is measured faster on a GPU: benchmarks/gpu_check.py)
    packed_attention: str = "auto"
    patch_dropout: float = 0.0      # share of patch tokens each training image drops (FLIP); 0 keeps all
    patch_dropout_until: float = 0.95  # after this share of the steps, train unmasked (FLIP's unmasked tuning)
    init_from: str = ""             # a model directory to start from (ignored once the run has a checkpoint)
    init_strict: bool = True        # false: load what matches, list missing / unexpected tensors
    eval: list[EvalConfig] = field(default_factory=list)  # evaluations run every eval_every steps and at the end
    eval_every: int = 0             # 0: evaluate only at the end
    best_metric: str = ""           # "<eval name>.<metric>", e.g. caption.CIDEr: keep the best model in RUN_DIR/best
    best_mode: str = "max"          # max | min

    def __post_init__(self):
        _positive(self, "checkpoint_every", "keep_checkpoints", "log_every", "val_batches", "accum_steps")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and (not isinstance(ac, int) or ac < 0):
            raise ConfigError(f"train.activation_checkpointing must be true, false or a number of blocks >= 0, got {ac!r}")
        if self.steps < 0 or isinstance(self.steps, bool):
            raise ConfigError(f"train.steps must be >= 0, got {self.steps!r}")
        self.eval = [from_dict(EvalConfig, e, "train.eval") if isinstance(e, dict) else e for e in self.eval]
        names = [e.name for e in self.eval]
        if len(set(names)) != len(names):
            raise ConfigError(f"train.eval names must be unique, got {names}; give repeated tasks a 'name'")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.best_mode not in ("max", "min"):
            raise ConfigError(f"train.best_mode must be 'max' or 'min', got {self.best_mode!r}")
        if self.best_metric:
            self.best_metric_task()  # validates
        if self.engine not in ENGINES:
            raise ConfigError(f"train.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage must be 0, 1 or 2 (ZeRO-3 shards parameters, which the "
                              f"CoCa forward does not gather), got {self.zero_stage}")
        if self.val_every < 0 or self.threads < 0:
            raise ConfigError("train.val_every and train.threads must be >= 0")
        if isinstance(self.patch_dropout, bool) or not isinstance(self.patch_dropout, (int, float)) \
                or not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"train.patch_dropout must be a share in [0, 1), got {self.patch_dropout!r}")
        if isinstance(self.patch_dropout_until, bool) or not isinstance(self.patch_dropout_until, (int, float)) \
                or not 0.0 <= self.patch_dropout_until <= 1.0:
            raise ConfigError(f"train.patch_dropout_until must be a share of the steps in [0, 1], got {self.patch_dropout_until!r}")
        if self.packed_attention not in ("auto", "groups", "flex"):
            raise ConfigError(f"train.packed_attention must be 'auto', 'groups' or 'flex', got {self.packed_attention!r}")
        if self.precision not in ("bf16", "fp32", "auto"):
            raise ConfigError(f"train.precision must be 'bf16', 'fp32' or 'auto', got {self.precision!r}")
        if not self.run_dir:
            raise ConfigError("train.run_dir must be set")

    def best_metric_task(self) -> EvalConfig:
        """The evaluation that ``best_metric`` refers to (a ConfigError when it names none)."""
        name, _, metric = self.best_metric.partition(".")
        by_name = {e.name: e for e in self.eval}
        if name not in by_name:
            raise ConfigError(f"train.best_metric {self.best_metric!r}: no evaluation named {name!r} in train.eval "
                              f"(names: {', '.join(by_name) or 'none'}); the form is '<eval name>.<metric>'")
        valid = EVAL_METRICS[by_name[name].task]
        if metric == "SPICE" and not by_name[name].spice:
            raise ConfigError(f"train.best_metric {self.best_metric!r}: evaluation {name!r} runs without SPICE; "
                              "set spice: true in it (needs Java and Stanford CoreNLP) or choose another metric")
        if metric not in valid:
            raise ConfigError(f"train.best_metric {self.best_metric!r}: {by_name[name].task} reports no {metric!r}"
                              f"{_nearest(metric, list(valid))}; metrics: {', '.join(valid)}")
        return by_name[name]


@dataclass
class RunConfig:
    model: CoCaConfig = field(default_factory=lambda: get_preset(DEFAULT_PRESET))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_model(spec: Any) -> CoCaConfig:
    """``model:`` may name a preset and override parts of it: {preset: coca-tiny, text: {vocab_size: 64}}."""
    if isinstance(spec, str):
        return get_preset(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"model must be a preset name or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    # overrides without a preset apply to the default model, as every other section's defaults do
    base = get_preset(spec.pop("preset", DEFAULT_PRESET)).to_dict()
    try:
        return CoCaConfig.from_dict(_deep_merge(base, spec))
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None


def parse_overrides(items: list[str]) -> dict:
    """["optim.lr=3e-4", "model.text.vocab_size=64"] -> nested dict; values parsed as YAML scalars."""
    import yaml
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:  # a malformed value or a tag safe_load refuses (never executed)
            reason = str(getattr(e, "problem", None) or e).strip()
            raise ConfigError(f"--set {key.strip()}: cannot read the value {value!r}: {reason}") from None
    return out


def run_config_from_dict(data: dict) -> RunConfig:
    data = dict(data or {})
    spec = data.pop("model", None)
    cfg = from_dict(RunConfig, data)
    if cfg.loss.contrastive_weight > 0 and cfg.data.batch_size * cfg.train.accum_steps < 2:
        # one pair has no negatives: its contrastive loss is 0 and every step would be skipped
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} with train.accum_steps={cfg.train.accum_steps}: "
                          "contrastive training needs at least 2 pairs per step; raise data.batch_size or set "
                          "loss.contrastive_weight=0 (captioning only)")
    if cfg.train.init_from:
        cfg.model = init_model_config(cfg.train, spec)
    else:
        cfg.model = resolve_model(DEFAULT_PRESET if spec is None else spec)
    return cfg


# Keys that change a tensor's shape or what the loaded weights compute (heads split the same
# matrices differently; the activation and relative-position range are part of what the weights
# learned): a run starting from a model directory may not override them.
ARCHITECTURE_KEYS = (
    "vision.image_size", "vision.patch_size", "vision.width", "vision.layers", "vision.heads", "vision.mlp_dim",
    "text.vocab_size", "text.d_model", "text.d_kv", "text.num_heads", "text.d_ff", "text.encoder_layers",
    "text.decoder_layers", "text.relative_buckets", "text.relative_max_distance", "vision.act",
    "embed_dim", "n_gen_queries", "pooler_heads", "family", "text.cls_mask", "text.decoder_start_id",
    "text.pad_id", "text.eos_id",
)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def init_model_config(train: TrainConfig, spec: Any) -> CoCaConfig:
    """The model of a run that starts from ``train.init_from``: that directory's config.json, with
    the run config's ``model`` overrides that keep the architecture (dropout, logit scale limit,
    ...). A resumed run reads the architecture it started with from RUN_DIR/config.yaml, so it
    no longer needs the directory."""
    import json
    from pathlib import Path

    import yaml

    from .layout import RunLayout
    run, init_dir = RunLayout(train.run_dir), Path(train.init_from)
    if not run.has_started() and train.init_from.startswith("hf-hub:"):
        from .hub import model_dir
        init_dir = model_dir(train.init_from)  # the snapshot in the Hugging Face cache; the run records its path
        train.init_from = str(init_dir)
    if run.has_started():
        base, source = yaml.safe_load(run.config.read_text())["model"], str(run.config)
    else:
        path = init_dir / "config.json"
        if not init_dir.is_dir():
            raise InputNotFound(f"train.init_from: model directory {str(init_dir)!r} not found")
        if not path.is_file():
            raise InputNotFound(f"train.init_from: {path} is missing; a model directory holds config.json and "
                                    "model.safetensors (the output of `coca init`, a run's model/ or best/)")
        try:
            base, source = json.loads(path.read_text()), str(path)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    try:
        base_cfg = CoCaConfig.from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if spec is None:
        return base_cfg
    if not isinstance(spec, (str, dict)):
        raise ConfigError(f"model must be a preset name or a mapping, got {type(spec).__name__}")
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None:
        # the preset as this config resolves it, its own overrides included: a directory trained
        # with this very config matches it
        resolved = resolve_model({"preset": preset, **spec})
        differ = [k for k in ARCHITECTURE_KEYS if _get(resolved, k) != _get(base_cfg, k)]
        if differ:
            shown = ", ".join(f"{k} ({_get(resolved, k)!r} here, {_get(base_cfg, k)!r} there)" for k in differ[:4])
            raise ConfigError(f"model.preset={preset!r} with this config's overrides differs from the model in "
                              f"train.init_from ({source}) in {shown}: the architecture comes from that "
                              "directory; remove model.preset")
    try:
        merged = CoCaConfig.from_dict(_deep_merge(base_cfg.to_dict(), spec))
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None
    for key in ARCHITECTURE_KEYS:
        if _get(merged, key) != _get(base_cfg, key):
            raise ConfigError(f"model.{key}={_get(merged, key)!r} would change the architecture of the model in "
                              f"train.init_from ({source} has {_get(base_cfg, key)!r}); the architecture comes from "
                              f"that directory: remove model.{key} (overrides such as model.text.dropout or "
                              "model.max_logit_scale apply)")
    return merged


def recipes_dir():
    """The run recipes shipped inside the package (``configs/`` in a checkout links here)."""
    from pathlib import Path
    return Path(__file__).parent / "configs"


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``coca train --config NAME``)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_config_path(path: str):
    """A config file by path, or else a shipped recipe by name (``demo``, ``coca-large-v2.yaml``):
    a file that exists always wins, so a user's own ``demo.yaml`` in the working directory is read."""
    from pathlib import Path
    p = Path(path)
    if p.is_file():
        return p
    name = p.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = recipes_dir() / f"{name}.yaml"
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    raise InputNotFound(f"config file {path!r} not found, and it is not a shipped recipe "
                        f"(`coca list` shows them: {', '.join(list_recipes())})")


def read_config_data(path: str | None, overrides: list[str] | None) -> dict:
    """The mapping in a YAML file (or {} without one) with ``--set key=value`` overrides merged in;
    ``path`` may also name a shipped recipe (``resolve_config_path``)."""
    import yaml
    data: dict = {}
    if path:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return data


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults) and apply ``--set key=value`` overrides."""
    data = read_config_data(path, overrides)
    try:
        return run_config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None
