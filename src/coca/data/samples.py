"""What every dataset reader shares: decoding raw bytes into (image, caption) or a counted skip.

A reader never raises on one bad sample. It returns ``Skipped(reason)`` and the batch collator
counts skips by reason, so a run reports exactly what it dropped and why.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from ..config import MAX_PIXELS  # noqa: F401 (the one pixel limit; imported from here by readers)

SKIP_REASONS = (
    "missing_image",       # caption without an image (or a file that does not exist)
    "decode_error",        # undecodable, truncated or zero-byte image
    "too_many_pixels",     # width * height above the pixel limit
    "missing_caption",     # image without a caption
    "bad_utf8",            # caption bytes are not UTF-8
    "empty_caption",       # caption empty after stripping whitespace
    "corrupt_tar_member",  # a tar member or header that cannot be read
)


@dataclass(frozen=True)
class Skipped:
    reason: str
    key: str = ""

    def __post_init__(self):
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")


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
            return im.convert("RGB")  # forces the full decode, so truncation shows up here
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
    text = " ".join(data.split())
    return text if text else Skipped("empty_caption", key)


class Collator:
    """Drops skipped samples, counts them by reason, stacks images and tokenizes captions.

    Output: {"images": [B, 3, S, S], "tokens": [B, L], "captions": list[str], "skipped": Counter}.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list) -> dict:
        skipped = Counter(s.reason for s in samples if isinstance(s, Skipped))
        good = [s for s in samples if not isinstance(s, Skipped)]
        captions = [c for _, c in good]
        images = torch.stack([im for im, _ in good]) if good else torch.empty(0)
        tokens = self.tokenizer.encode(captions) if good else torch.empty(0, dtype=torch.long)
        return {"images": images, "tokens": tokens, "captions": captions, "skipped": skipped}
