"""Image preprocessing and dataset readers."""

from .transforms import CLIP_MEAN, CLIP_STD, eval_transform, load_image

__all__ = ["CLIP_MEAN", "CLIP_STD", "eval_transform", "load_image"]
