"""coca: CoCa-Large-v2, a contrastive-captioning image-text model (ViT-L/14 + T5-Large).

The public names are imported on first use, so that tools which need no model (``coca data
prepare``'s workers, for one) do not load PyTorch."""

import importlib

__version__ = "0.1.0"

_WHERE = {"CoCa": "models.coca", "create_model": "models.coca", "load": "models.coca", "Tokenizer": "tokenizer",
          "OpenCLIPCoCa": "models.open_clip_coca", "CLIPTokenizer": "clip_tokenizer",
          "CoCaConfig": "config", "TextConfig": "config", "VisionConfig": "config", "list_presets": "config"}
_SUBMODULES = ("config", "convert", "generation")


def list_models() -> list[str]:
    """Names of the registered model presets."""
    return __getattr__("list_presets")()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'coca' has no attribute {name!r}")


__all__ = ["CoCa", "OpenCLIPCoCa", "CLIPTokenizer", "CoCaConfig", "TextConfig", "VisionConfig", "Tokenizer", "create_model", "load",
           "list_models", "convert", "config", "generation", "__version__"]
