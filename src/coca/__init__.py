"""coca: CoCa-Large-v2, a contrastive-captioning image-text model (ViT-L/14 + T5-Large)."""

from . import config, convert, generation
from .config import CoCaConfig, TextConfig, VisionConfig, list_presets
from .models.coca import CoCa, create_model, load
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def list_models() -> list[str]:
    """Names of the registered model presets."""
    return list_presets()


__all__ = ["CoCa", "CoCaConfig", "TextConfig", "VisionConfig", "Tokenizer", "create_model", "load",
           "list_models", "convert", "config", "generation", "__version__"]
