"""Per-sample filters of `coca data prepare`. Each rejection has a reason code (REJECT_REASONS)."""

from __future__ import annotations

import io
import re

from PIL import Image

from ..data.samples import Skipped, decode_caption, decode_image, normalise_caption
from .config import SCRIPTS, FilterConfig
from .dedup import REASONS as DUPLICATE_REASONS
from .hashing import caption_hash, image_hashes, minhash, pixel_hash

REJECT_REASONS = (
    # from reading and decoding (shared with the training readers)
    "missing_image", "decode_error", "too_many_pixels", "missing_caption", "bad_utf8", "empty_caption",
    "corrupt_tar_member", "unsupported_member",
    # filters
    "too_small", "bad_aspect", "no_content", "caption_too_short", "caption_too_long", "boilerplate_caption", "script",
    "low_similarity",
    # decontamination (dedup.against) and deduplication
    "eval_overlap", *DUPLICATE_REASONS,
)

_IMAGE_FILE = re.compile(r"^[\w\-. ()\[\]]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic)$", re.IGNORECASE)
_CAMERA_NAME = re.compile(r"^(img|dsc|dscn|dcim|pxl|photo|image|screenshot)[\s_\-]?\d+", re.IGNORECASE)
_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_PLACEHOLDERS = {
    "image", "images", "img", "photo", "photos", "picture", "pic", "untitled", "untitled image", "no title",
    "no image", "image not found", "thumbnail", "thumb", "placeholder", "default", "null", "none", "n a", "na",
    "unknown", "caption", "alt", "alt text", "logo", "icon", "banner", "click here", "read more", "stock photo",
}


def boilerplate(caption: str) -> bool:
    """File names, camera names (IMG_1234), URLs and placeholder captions ("untitled", "image 3")."""
    text = caption.strip()
    if _IMAGE_FILE.match(text) or _CAMERA_NAME.match(text) or _URL.search(text):
        return True
    norm = normalise_caption(text)
    return norm in _PLACEHOLDERS or re.sub(r"\s*\d+$", "", norm) in _PLACEHOLDERS


def script_fraction(caption: str, scripts: list[str]) -> float:
    """Fraction of the caption's letters that belong to ``scripts`` (1.0 without letters)."""
    ranges = [r for s in scripts for r in SCRIPTS[s]]
    letters = [ord(c) for c in caption if c.isalpha()]
    if not letters:
        return 1.0
    return sum(any(lo <= c <= hi for lo, hi in ranges) for c in letters) / len(letters)


def check_caption(caption: str, cfg: FilterConfig) -> str | None:
    words, chars = len(caption.split()), len(caption)
    if words < cfg.min_words or chars < cfg.min_chars:
        return "caption_too_short"
    if words > cfg.max_words or chars > cfg.max_chars:
        return "caption_too_long"
    if cfg.boilerplate and boilerplate(caption):
        return "boilerplate_caption"
    if cfg.scripts and script_fraction(caption, cfg.scripts) < cfg.min_script_fraction:
        return "script"
    return None


def check_image(image: Image.Image, cfg: FilterConfig) -> str | None:
    w, h = image.size
    if min(w, h) < cfg.min_side:
        return "too_small"
    if max(w, h) / min(w, h) > cfg.max_aspect:
        return "bad_aspect"
    return None


def process_sample(image_bytes: bytes | None, caption_raw, cfg: FilterConfig, key: str, jpeg_quality: int = 95):
    """Decode, filter and hash one raw sample.

    Returns (reason, None) for a rejected sample, or (None, record) where record holds the JPEG
    bytes to write, the caption, the size, the hashes and the content box (``image_hashes``).
    """
    caption = decode_caption(caption_raw, key)
    if isinstance(caption, Skipped):
        return caption.reason, None
    image = decode_image(image_bytes, cfg.max_pixels, key)
    if isinstance(image, Skipped):
        return image.reason, None
    reason = check_caption(caption, cfg) or check_image(image, cfg)
    if reason:
        return reason, None
    hashes = image_hashes(image, cfg.min_content)
    if hashes is None:  # nothing but uniform borders
        return "no_content", None
    if image_bytes[:3] == b"\xff\xd8\xff":  # JPEG already: keep the original bytes
        jpeg = image_bytes
    else:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=jpeg_quality)
        jpeg = buf.getvalue()
    return None, {
        "jpeg": jpeg, "caption": caption, "width": image.width, "height": image.height,
        "pixel_sha1": pixel_hash(image), **hashes, "caption_sha1": caption_hash(caption),
        "minhash": minhash(caption).tolist(), "_image": image,
    }
