"""Image transforms (torchvision.transforms.v2) and a safe image loader."""

from __future__ import annotations

import os
import re
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


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """'a red circle left of a blue square' -> '... right of ...' (case kept), for flipped images."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new
    return _LEFT_RIGHT.sub(swap, caption)


class TrainTransform:
    """(PIL image, caption, seed) -> (normalised [3, S, S] tensor, caption).

    Random resized crop, horizontal flip (swapping "left" and "right" in the caption so the flip
    never teaches a wrong caption), colour jitter. All randomness comes from ``seed``, so a
    sample's augmentation depends only on its position in the data stream: resuming a run, or
    changing the number of DataLoader workers, reproduces it exactly.
    """

    def __init__(self, image_size: int, crop_scale_min: float = 0.9, flip_prob: float = 0.5,
                 brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.02):
        self.crop = v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True,
                                         interpolation=v2.InterpolationMode.BICUBIC)
        self.flip_prob = flip_prob
        jitter = (brightness, contrast, saturation, hue)
        self.jitter = v2.ColorJitter(*jitter) if any(jitter) else None
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])

    @classmethod
    def from_config(cls, image_size: int, aug) -> "TrainTransform":
        return cls(image_size, aug.crop_scale_min, aug.flip_prob, aug.brightness, aug.contrast, aug.saturation, aug.hue)

    def __call__(self, image: Image.Image, caption: str, seed: int) -> tuple[torch.Tensor, str]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.crop(v2.functional.to_image(image))  # uint8 [3, S, S]
            if torch.rand(()).item() < self.flip_prob:
                x = v2.functional.horizontal_flip(x)
                caption = swap_left_right(caption)
            if self.jitter is not None:
                x = self.jitter(x)
        return self.finish(x), caption


class EvalTransform:
    """The evaluation counterpart with the same call signature: resize + centre crop, no randomness."""

    def __init__(self, image_size: int):
        self.transform = eval_transform(image_size)

    def __call__(self, image: Image.Image, caption: str, seed: int = 0) -> tuple[torch.Tensor, str]:
        return self.transform(image), caption
