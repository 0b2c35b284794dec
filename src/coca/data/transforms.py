"""Image transforms (torchvision.transforms.v2) and a safe image loader."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

# CLIP's normalisation statistics, so CLIP ViT weights see the inputs they were trained on.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eval_transform(image_size: int) -> v2.Compose:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: PIL image -> [3, S, S] float."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def load_image(path: str | os.PathLike, max_pixels: int = 178_956_970) -> Image.Image:
    """Open and fully decode an RGB image; a clear error names the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"image {path} has {im.width}x{im.height} pixels, above the limit of {max_pixels}")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} could not be decoded: {e}") from None
