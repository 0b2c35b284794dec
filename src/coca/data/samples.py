"""What every dataset reader shares: decoding raw bytes into (image, caption) or a counted skip.

A reader never raises on one bad sample. It returns ``Skipped(reason)`` and the batch collator
counts skips by reason, so a run reports exactly what it dropped and why.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..config import MAX_PIXELS  # noqa: F401 (the one pixel limit; imported from here by readers)

# Far beyond what a 77-token context keeps (web alt-texts are rarely over 1,000 characters):
# longer "captions" are page text or a broken scrape, not a description of the image.
MAX_CAPTION_CHARS = 10_000

SKIP_REASONS = (
    "missing_image",       # caption without an image (or a file that does not exist)
    "decode_error",        # undecodable, truncated or zero-byte image
    "too_many_pixels",     # width * height above the pixel limit
    "missing_caption",     # image without a caption
    "bad_utf8",            # caption bytes are not UTF-8
    "empty_caption",       # caption empty after stripping whitespace
    "caption_too_long",    # caption over MAX_CAPTION_CHARS characters
    "corrupt_tar_member",  # a tar member or header that cannot be read
    "unsupported_member",  # a sample whose image or caption is a link or device in the tar, not a file
)


@dataclass(frozen=True)
class Skipped:
    reason: str
    key: str = ""

    def __post_init__(self):
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")


_HIGH_BIT_MODES = {"I", "F"}  # and every "I;16..." mode


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Greyscale with more than 8 bits (16-bit PNG and TIFF, 32-bit integer or float
    images) is scaled from its range to 0-255 first: PIL's own conversion clips every value above
    255, which turns a 16-bit photograph nearly white. 16-bit integers map by their full range
    (x / 257, as PIL reduces 16-bit RGB); other integer and float images by their min-max range
    unless they already lie in 0-255 (integers) or 0-1 (floats)."""
    if image.mode not in _HIGH_BIT_MODES and not image.mode.startswith("I;16"):
        return image if image.mode == "RGB" else image.convert("RGB")
    import numpy as np
    a = np.asarray(image, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        a = a / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif not (image.mode == "I" and lo >= 0 and hi <= 255):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return grey.convert("RGB")


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS, key: str = "") -> Image.Image | Skipped:
    """Fully decode image bytes to RGB, or say why not."""
    if data is None:
        return Skipped("missing_image", key)
    if not data:
        return Skipped("decode_error", key)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:  # checked from the header, before decoding pixels
                return Skipped("too_many_pixels", key)
            im.load()  # the full decode, so truncation shows up here
            return to_rgb(im)
    except Image.DecompressionBombError:
        return Skipped("too_many_pixels", key)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return Skipped("decode_error", key)


_PUNCT = re.compile(r"[^\w\s]")


def normalise_caption(caption: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed: the form captions are compared in
    (what COCO's PTB tokenizer does to plain text; also the key of caption deduplication)."""
    return " ".join(_PUNCT.sub(" ", caption.lower()).split())


def decode_caption(data: bytes | str | None, key: str = "") -> str | Skipped:
    if data is None:
        return Skipped("missing_caption", key)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return Skipped("bad_utf8", key)
    if len(data) > MAX_CAPTION_CHARS:
        return Skipped("caption_too_long", key)
    text = " ".join(data.split())
    return text if text else Skipped("empty_caption", key)


class Collator:
    """Drops skipped samples, counts them by reason, stacks images and tokenizes captions.

    Output: {"images": [B, 3, S, S], "tokens": [B, L], "captions": list[str], "skipped": Counter}.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list) -> dict:
        import torch  # here, so that decoding and filtering (coca data prepare) do not load PyTorch
        skipped = Counter(s.reason for s in samples if isinstance(s, Skipped))
        good = [s for s in samples if not isinstance(s, Skipped)]
        captions = [c for _, c in good]
        images = torch.stack([im for im, _ in good]) if good else torch.empty(0)
        tokens = self.tokenizer.encode(captions) if good else torch.empty(0, dtype=torch.long)
        return {"images": images, "tokens": tokens, "captions": captions, "skipped": skipped}
