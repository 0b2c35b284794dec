"""Image preprocessing and dataset readers (the transforms, which need PyTorch, load on first use)."""

import importlib

__all__ = ["CLIP_MEAN", "CLIP_STD", "eval_transform", "load_image"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".transforms", __name__), name)
    raise AttributeError(f"module 'coca.data' has no attribute {name!r}")
