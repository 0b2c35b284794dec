"""A built-in captioning dataset that needs no download: procedurally drawn shape scenes.

Each scene holds one or two objects, each a (size, colour, shape) drawn from 2 x 6 x 3 values, on
a lightly textured background. Captions come from one fixed grammar, so every scene has exactly
one canonical caption and exact-match accuracy of generated captions is meaningful:

    one object   "a small red circle"
    two objects  "a large blue square left of a small red circle"

In a two-object caption the object named first is chosen by a rule that ignores position
(larger first, then colour order, then shape order) and the relation says where it stands. That
rule commutes with a horizontal flip: flipping the image and swapping "left"/"right" in its
caption gives exactly the canonical caption of the flipped scene, so flip augmentation never
teaches a caption the grammar would not produce.

Scenes are a pure function of (seed, split, index): the same dataset on every machine, with
disjoint train / val / test streams.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

COLOURS = {
    "red": (220, 38, 38), "green": (34, 160, 60), "blue": (37, 78, 225),
    "yellow": (240, 205, 30), "purple": (140, 55, 185), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.26, "large": 0.40}  # object extent as a fraction of the image side
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Obj:
    size: str
    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def order_key(self) -> tuple[int, int, int]:
        return (0 if self.size == "large" else 1, list(COLOURS).index(self.colour), SHAPES.index(self.shape))


def caption_for(objects_left_to_right: tuple[Obj, ...]) -> str:
    """The canonical caption of a scene whose objects are listed from left to right."""
    if len(objects_left_to_right) == 1:
        return objects_left_to_right[0].phrase
    left, right = objects_left_to_right
    if left.order_key <= right.order_key:
        return f"{left.phrase} left of {right.phrase}"
    return f"{right.phrase} right of {left.phrase}"


def class_names() -> list[str]:
    """The 18 colour x shape classes used for zero-shot evaluation ("red circle", ...)."""
    return [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]


def all_objects() -> list[Obj]:
    return list(_OBJECTS)


_OBJECTS = tuple(Obj(*t) for t in itertools.product(SIZES, COLOURS, SHAPES))


def sample_objects(rng: np.random.Generator, max_objects: int = 2) -> tuple[Obj, ...]:
    objects = _OBJECTS
    n = int(rng.integers(1, max_objects + 1))
    first = objects[rng.integers(len(objects))]
    if n == 1:
        return (first,)
    while True:  # two different objects, so "A left of A" never occurs
        second = objects[rng.integers(len(objects))]
        if second != first:
            return (first, second)


def render(objects: tuple[Obj, ...], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw objects left to right; each keeps a margin so a mild random crop never cuts it off."""
    s = image_size
    base = rng.integers(200, 246)
    noise = rng.integers(-8, 9, size=(s, s, 1))
    bg = np.clip(base + noise + rng.integers(-6, 7, size=(1, 1, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)  # noise [s, s, 1] + tint [1, 1, 3]: already [s, s, 3]
    draw = ImageDraw.Draw(img)
    n = len(objects)
    for i, obj in enumerate(objects):
        extent = SIZES[obj.size] * s * rng.uniform(0.92, 1.08)
        half = extent / 2
        # each object sits near the centre of its own horizontal slot (the whole width for one
        # object, a half for two) with a small jitter: position varies, but not so much that a
        # tiny model needs thousands of steps to learn shape independent of position
        slot = s / n
        cx = slot * (i + 0.5) + rng.uniform(-0.06, 0.06) * s
        cy = s / 2 + rng.uniform(-0.08, 0.08) * s
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = tuple(min(max(c + int(d), 0), 255) for c, d in zip(COLOURS[obj.colour], rng.integers(-12, 13, size=3)))
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return img


class SyntheticScenes:
    """Map-style dataset of (PIL image, caption); ``scene(i)`` also gives the objects.

    ``max_objects=1`` gives the single-object scenes used for zero-shot classification.
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0, image_size: int = 64, max_objects: int = 2):
        if split not in SPLITS:
            raise UserError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if max_objects not in (1, 2):
            raise UserError(f"max_objects must be 1 or 2, got {max_objects}")
        if n < 1:
            raise UserError(f"a synthetic dataset needs n >= 1 scenes, got {n}")
        self.n, self.split, self.seed, self.image_size, self.max_objects = n, split, seed, image_size, max_objects

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], self.max_objects, index])

    def scene(self, index: int) -> tuple[Obj, ...]:
        return sample_objects(self._rng(index), self.max_objects)

    def load(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.n:
            raise IndexError(f"scene {index} out of range [0, {self.n})")
        rng = self._rng(index)
        objects = sample_objects(rng, self.max_objects)
        return render(objects, self.image_size, rng), caption_for(objects)

    def captions(self) -> list[str]:
        return [caption_for(self.scene(i)) for i in range(self.n)]
