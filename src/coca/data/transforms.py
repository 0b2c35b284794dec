"""Image transforms (torchvision.transforms.v2) and a safe image loader."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from ..config import MAX_PIXELS
from ..errors import InputNotFound, UserError
from .samples import to_rgb

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


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an RGB image; a clear error names the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"image {str(path)!r} not found")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise UserError(f"image {path} has {im.width}x{im.height} pixels, above the limit of {max_pixels}")
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UserError(f"image {path} could not be decoded: {e}") from None


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
# "left" / "right" as a direction: "left of", "on the right", "the left side", "top left", "left-hand".
# Not "she left the room", "all right", "the right to vote": words that are not a direction stay.
_SPATIAL = re.compile(
    r"\b(?:(?P<pre>(?:the|to|at|on|far|top|bottom|upper|lower)[\s-]+)(?P<a>left|right)\b(?!\s+to\b)"  # not "the right to vote"
    r"|(?P<b>left|right)(?=(?:\s+(?:of|side|sides|hand|corner|edge|half|part|wing|arm|leg|eye|ear|foot|lane)\b)|-hand\b))",
    re.IGNORECASE)
FLIP_SWAP_MODES = ("spatial", "all", "none")


def _swapped(word: str) -> str:
    new = "right" if word.lower() == "left" else "left"
    return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new


def swap_left_right(caption: str, mode: str = "spatial") -> str:
    """The caption of the horizontally flipped image (case kept).

    ``spatial`` swaps "left" and "right" only where they name a direction ("a red circle left of a
    blue square" -> "... right of ...", "on the left" -> "on the right"), so web captions such as
    "she left the room" stay intact; ``all`` swaps every occurrence (captions from a closed
    grammar); ``none`` keeps the caption."""
    if mode == "none":
        return caption
    if mode == "all":
        return _LEFT_RIGHT.sub(lambda m: _swapped(m.group(0)), caption)

    def swap(m: re.Match) -> str:
        if m.group("a"):
            return m.group("pre") + _swapped(m.group("a"))
        return _swapped(m.group("b"))
    return _SPATIAL.sub(swap, caption)


# Colour jitter on float [3, H, W] images in [0, 1], as torchvision's adjust_* functions compute
# it (blend with black, the mean grey level, or the grey image; ITU-R 601 luma), written without
# their dispatch and checks: a 64 px image spends less time in these than in the calls.
_LUMA = (0.2989, 0.587, 0.114)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(0)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(0)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x.mul(factor).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x.mul(factor).add_((1 - factor) * _grey(x).mean()).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x.mul(factor).add_(_grey(x), alpha=1 - factor).clamp_(0, 1)


class TrainTransform:
    """(PIL image, caption, seed) -> (normalised [3, S, S] tensor, caption).

    Random resized crop, horizontal flip (swapping "left" and "right" in the caption so the flip
    never teaches a wrong caption), colour jitter. All randomness comes from a generator seeded
    with ``seed``, so a sample's augmentation depends only on its position in the data stream:
    resuming a run, or changing the number of DataLoader workers, reproduces it exactly. The
    parameters are drawn here rather than by the v2 transform classes, which use the global RNG
    (saving and restoring it per sample cost more than the crop itself).
    """

    RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range

    def __init__(self, image_size: int, crop_scale_min: float = 0.9, flip_prob: float = 0.5,
                 brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.02,
                 flip_swap_words: str = "spatial"):
        self.size = image_size
        self.flip_swap_words = flip_swap_words
        self.scale = (crop_scale_min, 1.0)
        self.flip_prob = flip_prob
        self.jitter = [(fn, lo, hi) for fn, lo, hi, amount in (
            (adjust_brightness, 1 - brightness, 1 + brightness, brightness),
            (adjust_contrast, 1 - contrast, 1 + contrast, contrast),
            (adjust_saturation, 1 - saturation, 1 + saturation, saturation),
            (v2.functional.adjust_hue, -hue, hue, hue)) if amount > 0]
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    @classmethod
    def from_config(cls, image_size: int, aug) -> "TrainTransform":
        return cls(image_size, aug.crop_scale_min, aug.flip_prob, aug.brightness, aug.contrast, aug.saturation, aug.hue,
                   aug.flip_swap_words)

    def crop_box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """RandomResizedCrop's sampling (10 tries, then its fallback), from generator ``g``."""
        if self.scale[0] >= 1.0:  # only the whole area may be drawn: the tries would find nothing else
            return self.fallback_box(height, width)
        area = height * width
        log_ratio = (math.log(self.RATIO[0]), math.log(self.RATIO[1]))
        for _ in range(10):
            u = torch.rand(2, generator=g).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        return self.fallback_box(height, width)

    def fallback_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's fallback: the whole image, or its centre cut to the nearest allowed aspect."""
        w, h = width, height
        if width / height < self.RATIO[0]:
            h = round(width / self.RATIO[0])
        elif width / height > self.RATIO[1]:
            w = round(height * self.RATIO[1])
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, caption: str, seed: int) -> tuple[torch.Tensor, str]:
        g = torch.Generator().manual_seed(seed)
        image = to_rgb(image)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
        top, left, h, w = self.crop_box(x.shape[-2], x.shape[-1], g)
        x = v2.functional.resized_crop(x, top, left, h, w, [self.size, self.size],
                                       interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand((), generator=g).item() < self.flip_prob:
            x = v2.functional.horizontal_flip(x)
            caption = swap_left_right(caption, self.flip_swap_words)
        x = x.float().div_(255)  # jitter in float: faster than uint8
        if self.jitter:  # like ColorJitter: each factor uniform in its range, applied in random order
            u = torch.rand(len(self.jitter), generator=g).tolist()
            for i in torch.randperm(len(self.jitter), generator=g).tolist():
                fn, lo, hi = self.jitter[i]
                x = fn(x, lo + u[i] * (hi - lo))
        return x.sub_(self.mean).div_(self.std), caption


class EvalTransform:
    """The evaluation counterpart with the same call signature: resize + centre crop, no randomness."""

    def __init__(self, image_size: int):
        self.transform = eval_transform(image_size)

    def __call__(self, image: Image.Image, caption: str, seed: int = 0) -> tuple[torch.Tensor, str]:
        return self.transform(image), caption
