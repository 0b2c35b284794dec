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
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and what is expected."""


def _nearest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


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
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{path}' must be {hint.__name__}, got {value!r}")
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

    def __post_init__(self):
        _positive(self, "vocab_size", "context_length", "d_model", "d_kv", "num_heads", "d_ff",
                  "encoder_layers", "decoder_layers", "relative_buckets", "relative_max_distance")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"text.dropout must be in [0, 1), got {self.dropout}")
        for key in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise ConfigError(f"text.{key} {getattr(self, key)} is outside the vocabulary [0, {self.vocab_size})")


@dataclass
class CoCaConfig:
    name: str = "custom"
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
        if self.text.d_model % self.pooler_heads:
            raise ConfigError(f"text.d_model {self.text.d_model} is not divisible by pooler_heads {self.pooler_heads}")

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

# A few million parameters at 64px: every test and the demo use it. Patch 16 keeps the ViT at
# 16 tokens, which is what makes a CPU training step take a fraction of a second.
register_preset(CoCaConfig(
    name="coca-tiny",
    vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=4, heads=4, mlp_dim=512),
    text=TextConfig(vocab_size=1024, d_model=128, d_kv=32, num_heads=4, d_ff=512,
                    encoder_layers=3, decoder_layers=3),
    embed_dim=128, n_gen_queries=16, pooler_heads=4,
))
