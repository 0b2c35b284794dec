"""A planted-duplicates dataset for measuring deduplication (tests and benchmarks/prepare.py).

Distinct "photos" (random gradients, shapes and noise; no two alike) with distinct captions, plus
copies of some of them: byte-exact copies, resized, recompressed at low JPEG quality, and cropped
by a few pixels, each with its caption's case or punctuation changed. The truth is which sample
copies which.

``web_planted_samples`` adds the copies web data is full of (``WEB_COPY_KINDS``: letterbox and
pillarbox borders of several widths and colours, text or a logo in a corner, a caption bar) and
look-alikes that are genuinely different pictures and must all be kept (``LOOKALIKE_KINDS``: the
same scene with other objects, the same texture at another place, frames of a slow pan).
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .layout import WorkLayout

WORDS = ("red blue green yellow small large old new wooden metal bright dark happy quiet busy empty "
         "dog cat house tree car boat street river mountain city beach garden kitchen window table "
         "woman man child bird horse flower bridge train road field sky cloud lamp chair book").split()
COPY_KINDS = ("exact", "resized", "recompressed", "cropped")
WEB_COPY_KINDS = ("border", "overlay_text", "overlay_logo", "caption_bar")
LOOKALIKE_KINDS = ("scene_objects", "texture_shift", "pan_frames")


def random_photo(seed: int, size: int = 224, width: int | None = None) -> Image.Image:
    """A distinct picture for each seed: a colour gradient, 10-20 shapes and noise (``width`` for a
    wider one, e.g. a panorama to take frames from)."""
    rng = np.random.default_rng(seed)
    width = width or size
    y, x = np.mgrid[0:size, 0:width] / size
    if width != size:
        x = x * size / width
    base = np.stack([rng.uniform(0, 255) * (1 - x) * rng.uniform(0.3, 1) + rng.uniform(0, 255) * y
                     for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw_shapes(ImageDraw.Draw(img), rng, int(rng.integers(10, 20)) * width // size, width, size)
    return img


def draw_shapes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, width: int, height: int,
                scale: tuple[float, float] = (0.05, 0.4)) -> None:
    """Shapes of varied brightness (distinct layouts in grey): ellipses, rectangles, thick lines."""
    for _ in range(n):
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * (width, height)
        w, h = rng.uniform(*scale, 2) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        box = (x0, y0, x0 + w, y0 + h)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(3, 15)))


def random_caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(5, 11))))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def copy_of(data: bytes, caption: str, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "exact":
        out = data
    elif kind == "resized":
        f = rng.uniform(0.5, 0.9)
        out = jpeg(image.resize((round(image.width * f), round(image.height * f)), Image.Resampling.BICUBIC))
    elif kind == "recompressed":
        out = jpeg(image, quality=int(rng.integers(30, 60)))
    else:
        c = int(rng.integers(2, 6))
        out = jpeg(image.crop((c, c, image.width - c, image.height - c)))
    return out, caption_variant(caption, rng)


def caption_variant(caption: str, rng: np.random.Generator) -> str:
    variant = int(rng.integers(3))
    return caption.upper() if variant == 0 else caption.capitalize() + "." if variant == 1 else caption + "!!"


BORDER_COLOURS = ("black", "white", "colour", "blurred")


def with_border(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Letterbox (top and bottom) or pillarbox (left and right) bars: 3-8 px or 5%, 12% or 22% of the
    side; black, white, a random colour, or blurred padding close to constant (the picture's mean
    colour with a little of its coarse variation, blurred); then, half the time, scaled back to the original's
    longer side, as a repost in a fixed frame would be."""
    w, h = image.size
    horizontal = bool(rng.integers(2))  # bars left and right
    side = h if horizontal else w
    bar = int(rng.integers(3, 9)) if rng.random() < 0.25 else round(side * float(rng.choice([0.05, 0.12, 0.22])))
    size = (w + 2 * bar, h) if horizontal else (w, h + 2 * bar)
    colour = BORDER_COLOURS[int(rng.integers(len(BORDER_COLOURS)))]
    if colour == "blurred":  # the picture's mean colour with a tenth of its 2 x 2 variation, blurred
        mean = np.asarray(image, np.float32).mean((0, 1))
        coarse = np.asarray(image.resize((2, 2), Image.Resampling.BOX).resize(size, Image.Resampling.BILINEAR), np.float32)
        canvas = Image.fromarray(np.clip(mean + 0.1 * (coarse - mean), 0, 255).astype(np.uint8))
        canvas = canvas.filter(ImageFilter.GaussianBlur(max(size) / 16))
    else:
        fill = {"black": (0, 0, 0), "white": (255, 255, 255)}.get(colour) or tuple(int(c) for c in rng.integers(0, 256, 3))
        canvas = Image.new("RGB", size, fill)
    canvas.paste(image, (bar, 0) if horizontal else (0, bar))
    if rng.random() < 0.5:
        f = max(w, h) / max(size)
        canvas = canvas.resize((round(size[0] * f), round(size[1] * f)), Image.Resampling.BICUBIC)
    return canvas


def _corner_box(image: Image.Image, box_w: int, box_h: int, corner: int, rng) -> tuple[int, int]:
    margin = int(rng.integers(0, max(1, image.width // 25)))
    x = margin if corner in (0, 2) else image.width - box_w - margin
    y = margin if corner in (0, 1) else image.height - box_h - margin
    return x, y


def _font(height: int):
    return ImageFont.load_default(size=max(8, height))


def with_overlay(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """``overlay_text``: a watermark (a word or a handle, white or black, half or fully opaque) in a
    random corner; ``overlay_logo``: a badge (a box of a random colour with a disc and a bar on it).
    Small (12-16% of the width) or medium (22-30%)."""
    out = image.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    corner, medium = int(rng.integers(4)), bool(rng.integers(2))
    span = round(out.width * (rng.uniform(0.22, 0.30) if medium else rng.uniform(0.12, 0.16)))
    alpha = int(rng.choice([128, 255]))
    if kind == "overlay_text":
        text = str(rng.choice(["@photos", "stock", "(c) 2026", "SAMPLE", "news24"]))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=_font(span // 2))
        font = _font(max(8, round(span // 2 * span / max(1, right - left))))  # text as wide as the span
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = _corner_box(out, right - left, bottom - top, corner, rng)
        shade = 255 if rng.random() < 0.5 else 0
        draw.text((x - left, y - top), text, font=font, fill=(shade, shade, shade, alpha),
                  stroke_width=max(1, span // 40), stroke_fill=(255 - shade, 255 - shade, 255 - shade, alpha))
    else:
        height = round(span * rng.uniform(0.5, 0.8))
        x, y = _corner_box(out, span, height, corner, rng)
        back, front = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        draw.rectangle((x, y, x + span, y + height), fill=(*back, alpha))
        draw.ellipse((x + height // 8, y + height // 8, x + height * 7 // 8, y + height * 7 // 8), fill=(*front, alpha))
        draw.rectangle((x + height, y + height // 3, x + span - height // 8, y + height * 2 // 3), fill=(*front, alpha))
    return Image.alpha_composite(out, layer).convert("RGB")


def with_caption_bar(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A news-style bar across the top or bottom (10-15% of the height, dark or light, opaque or
    translucent) with a line of text in it."""
    out = image.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    height = round(out.height * rng.uniform(0.10, 0.15))
    top = 0 if rng.random() < 0.5 else out.height - height
    dark = rng.random() < 0.5
    draw.rectangle((0, top, out.width, top + height), fill=(0, 0, 0, int(rng.choice([170, 255]))) if dark
                   else (240, 240, 240, int(rng.choice([170, 255]))))
    words = " ".join(rng.choice(WORDS, 4))
    draw.text((out.width // 30, top + height // 6), words, font=_font(height * 2 // 3),
              fill=(255, 255, 255, 255) if dark else (0, 0, 0, 255))
    return Image.alpha_composite(out, layer).convert("RGB")


def web_copy_of(data: bytes, caption: str, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A copy of one of ``WEB_COPY_KINDS``, re-encoded as JPEG at quality 75-95."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "border":
        image = with_border(image, rng)
    elif kind == "caption_bar":
        image = with_caption_bar(image, rng)
    else:
        image = with_overlay(image, kind, rng)
    return jpeg(image, quality=int(rng.integers(75, 96))), caption_variant(caption, rng)


def lookalikes(kind: str, seed: int, size: int = 224, n: int = 3) -> list[Image.Image]:
    """``n`` genuinely different pictures that look alike:

    - ``scene_objects``: one scene, each picture with 4-6 other objects (15-35% of the side) drawn on it;
    - ``texture_shift``: one texture (dense small shapes and noise), each picture cut from another
      place of it, at least 40% of the side apart;
    - ``pan_frames``: frames of a slow pan across a wide scene, 18% of the width apart."""
    rng = np.random.default_rng(seed)
    if kind == "scene_objects":
        base = random_photo(seed, size)
        out = []
        for _ in range(n):
            image = base.copy()
            draw_shapes(ImageDraw.Draw(image), rng, int(rng.integers(4, 7)), size, size, scale=(0.15, 0.35))
            out.append(image)
        return out
    if kind == "texture_shift":
        big = 3 * size
        texture = Image.fromarray(np.clip(rng.uniform(60, 200, 3) + rng.normal(0, 6, (big, big, 3)), 0, 255)
                                  .astype(np.uint8))
        draw_shapes(ImageDraw.Draw(texture), rng, 400, big, big, scale=(0.02, 0.08))
        spots = [(0, 0), (2 * size, 0), (0, 2 * size), (2 * size, 2 * size), (size, size)]
        return [texture.crop((sx, sy, sx + size, sy + size)) for sx, sy in spots[:n]]
    if kind == "pan_frames":
        step = round(size * 0.18)
        wide = random_photo(seed, size, width=size + step * (n - 1))
        return [wide.crop((i * step, 0, i * step + size, size)) for i in range(n)]
    raise ValueError(f"unknown look-alike kind {kind!r}")


def web_planted_samples(n_distinct: int, n_copies: int, n_lookalike_groups: int, seed: int = 0, size: int = 224,
                        kinds: tuple[str, ...] = COPY_KINDS + WEB_COPY_KINDS):
    """Distinct pictures, copies of them of every kind in ``kinds`` (in turn), and groups of 3
    look-alikes of each of ``LOOKALIKE_KINDS`` (in turn), shuffled.

    Returns ([(key, jpeg bytes, caption)], {copy key: original key}, {key: copy or look-alike kind}).
    Look-alikes are originals (keys ``l...``): every one of them must be kept."""
    rng = np.random.default_rng(seed)
    originals = [(f"o{i:07d}", jpeg(random_photo(seed * 10_000_019 + i, size)), random_caption(rng))
                 for i in range(n_distinct)]
    samples, truth, kind_of = list(originals), {}, {}
    for j in range(n_copies):
        key, data, caption = originals[int(rng.integers(n_distinct))]
        kind = kinds[j % len(kinds)]
        out, text = (copy_of if kind in COPY_KINDS else web_copy_of)(data, caption, kind, rng)
        samples.append((f"c{j:07d}", out, text))
        truth[f"c{j:07d}"], kind_of[f"c{j:07d}"] = key, kind
    for g in range(n_lookalike_groups):
        kind = LOOKALIKE_KINDS[g % len(LOOKALIKE_KINDS)]
        for i, image in enumerate(lookalikes(kind, seed * 7_000_003 + 500_000_000 + g, size)):
            key = f"l{g:06d}{i}"
            samples.append((key, jpeg(image), random_caption(rng)))
            kind_of[key] = kind
    order = rng.permutation(len(samples))
    return [samples[i] for i in order], truth, kind_of


def planted_samples(n_distinct: int, n_copies: int, seed: int = 0, size: int = 224):
    """[(key, jpeg bytes, caption)] in a shuffled order, and {copy key: original key}."""
    rng = np.random.default_rng(seed)
    originals = [(f"o{i:07d}", jpeg(random_photo(seed * 10_000_019 + i, size)), random_caption(rng))
                 for i in range(n_distinct)]
    samples, truth = list(originals), {}
    for j in range(n_copies):
        key, data, caption = originals[int(rng.integers(n_distinct))]
        out, text = copy_of(data, caption, COPY_KINDS[j % len(COPY_KINDS)], rng)
        samples.append((f"c{j:07d}", out, text))
        truth[f"c{j:07d}"] = key
    order = rng.permutation(len(samples))
    return [samples[i] for i in order], truth


def write_shards(samples, directory, per_shard: int) -> list[str]:
    """img2dataset-layout tars: {key}.jpg + {key}.txt."""
    from pathlib import Path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(samples), per_shard):
        path = directory / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for key, data, caption in samples[s:s + per_shard]:
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def score(rejects: list[dict], uid_to_key: dict[str, str], truth: dict[str, str]) -> dict:
    """Duplicate recall and precision from the rejects (rows with reason duplicate_*).

    Each original with its copies forms one group, of which all but one must be removed (which one
    is kept does not matter). A removal is correct when the sample and the one it duplicates
    belong to the same group; recall = correct removals / planted copies."""
    removed = [(uid_to_key[r["uid"]], uid_to_key[r["duplicate_of"]]) for r in rejects
               if str(r["reason"]).startswith("duplicate_")]
    tp = sum(1 for key, of in removed if truth.get(key, key) == truth.get(of, of))
    return {"planted": len(truth), "removed": len(removed), "true_positives": tp,
            "recall": tp / max(1, len(truth)), "precision": tp / max(1, len(removed))}


def found_copies(rejects: list[dict], uid_to_key: dict[str, str], truth: dict[str, str]) -> set[str]:
    """The copies that ended in their original's group: the copy removed as a duplicate of a member
    of the group, or the original removed and the copy kept in its place."""
    group = {uid_to_key[r["uid"]]: uid_to_key[r["duplicate_of"]] for r in rejects
             if str(r["reason"]).startswith("duplicate_")}  # removed sample -> the kept one
    return {c for c, original in truth.items() if group.get(c, c) == group.get(original, original)}


def synthetic_hash_records(work, n: int, n_tasks: int, seed: int = 0, variants: int = 4, captions: bool = False,
                           chain_length: int = 4) -> dict:
    """Filter-stage output (``work/filter/task_N/meta.parquet``) of ``n`` samples with random hashes
    and planted duplicates, to measure and test stage 2 without images. Of every 20 samples: one
    exact copy (same pixel hash and pHashes) of one of the first n/40 samples, two near copies (each variant 1-3 bits away) and one
    link of a chain — a run of ``chain_length`` samples, each 3 bits from the previous, so that
    its ends are farther apart than the threshold and only connected components join them — and
    one overlay copy (unrelated pHashes; the centre and 5 other region hashes 0-2 bits from the
    source's, 3 regions new: found by the region rule alone). With
    ``captions``, one in 20 captions is a near copy (8 of 64 MinHash values changed) of another.
    With 4 variants the last equals the first for 9 in 10 samples (a picture without borders).
    Returns counts of what was planted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2 ** 63, (n, variants), dtype=np.int64).view(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, (n, variants)).astype(np.uint64)
    sha = rng.integers(0, 256, (n, 20), dtype=np.uint8)
    slot = np.arange(n) % 20
    source = rng.integers(0, n, n)

    def flip(rows, bits):
        out = hashes[rows].copy()
        for _ in range(bits):
            out ^= np.uint64(1) << rng.integers(0, 64, out.shape).astype(np.uint64)
        return out

    regions = rng.integers(0, 2 ** 63, (n, 9), dtype=np.int64).view(np.uint64) * np.uint64(2)
    exact = np.flatnonzero(slot == 0)  # copies of a few popular pictures: groups of 2-4 copies
    popular = source[exact] % max(1, n // 40)
    hashes[exact], sha[exact], regions[exact] = hashes[popular], sha[popular], regions[popular]
    near = np.flatnonzero((slot == 1) | (slot == 2))
    hashes[near] = flip(source[near], int(rng.integers(1, 4)))
    overlay = np.flatnonzero(slot == 4)
    regions[overlay] = regions[source[overlay]]
    for bit in range(2):
        regions[overlay] ^= (rng.random((overlay.size, 9)) < 0.5).astype(np.uint64) << rng.integers(0, 64, (overlay.size, 9)).astype(np.uint64)
    corner = rng.choice([0, 1, 2, 3, 5, 6, 7, 8], 3, replace=False)
    regions[overlay[:, None], corner[None, :]] = rng.integers(0, 2 ** 63, (overlay.size, 3)).astype(np.uint64)
    links = np.flatnonzero(slot == 3)
    for c in range(0, links.size - chain_length + 1, chain_length):  # chain: each link 3 bits from the last
        for a, b in zip(links[c:c + chain_length - 1], links[c + 1:c + chain_length]):
            hashes[b] = hashes[a]
            for v in range(variants):
                for bit in rng.choice(64, 3, replace=False):
                    hashes[b, v] ^= np.uint64(1) << np.uint64(bit)
    if variants > 3:  # as image_hashes gives them: the untrimmed pHash equals the first variant unless the
        untrimmed = rng.random(n) >= 0.1  # picture had borders (1 in 10 here)
        hashes[untrimmed, 3:] = hashes[untrimmed, :1]
    signed = hashes.view(np.int64)
    sigs = rng.integers(0, 2 ** 32, (n, 64), dtype=np.uint64).astype(np.uint32) if captions else None
    cap_sha = rng.integers(0, 256, (n, 20), dtype=np.uint8)
    if captions:
        copies = np.flatnonzero(slot == 5)
        sigs[copies] = sigs[source[copies]]
        sigs[copies, :8] = rng.integers(0, 2 ** 32, (copies.size, 8), dtype=np.uint64).astype(np.uint32)
    bounds = np.linspace(0, n, n_tasks + 1).astype(int)
    for t in range(n_tasks):
        lo, hi = bounds[t], bounds[t + 1]
        rows = hi - lo
        uid = [WorkLayout.uid(t, r) for r in range(rows)]
        table = pa.table({
            "uid": uid, "key": [f"s{lo + r}" for r in range(rows)], "source": [f"synthetic:{lo + r}" for r in range(rows)],
            "width": pa.array(np.full(rows, 224, np.int32)), "height": pa.array(np.full(rows, 224, np.int32)),
            "caption": [""] * rows, "pixel_sha1": [bytes(x).hex() for x in sha[lo:hi]],
            "phash": pa.ListArray.from_arrays(np.arange(0, rows * variants + 1, variants, dtype=np.int32),
                                              pa.array(signed[lo:hi].reshape(-1))),
            "regions": pa.ListArray.from_arrays(np.arange(0, rows * 9 + 1, 9, dtype=np.int32),
                                                pa.array(regions[lo:hi].view(np.int64).reshape(-1))),
            "caption_sha1": [bytes(x).hex() for x in cap_sha[lo:hi]],
            "minhash": pa.ListArray.from_arrays(
                np.arange(0, rows * 64 + 1, 64, dtype=np.int32) if captions else np.zeros(rows + 1, np.int32),
                pa.array(sigs[lo:hi].reshape(-1) if captions else np.zeros(0, np.uint32), pa.uint32())),
        })
        d = WorkLayout(work).filter_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, d / "meta.parquet")
    return {"samples": n, "exact_copies": int(exact.size), "near_copies": int(near.size), "chain_links": int(links.size),
            "overlay_copies": int(overlay.size)}


def planted_eval_copies(n_eval: int, n_copies: int, seed: int = 0, size: int = 224):
    """Evaluation pictures [(file name, JPEG bytes)] — none alike, nor like ``planted_samples``' —
    and training samples copying some of them [(key, bytes, caption)], ``COPY_KINDS`` in turn, with
    {copy key: evaluation file name}."""
    rng = np.random.default_rng(seed + 1)
    evals = [(f"eval{i:06d}.jpg", jpeg(random_photo(1_000_000_007 + seed * 100_003 + i, size)))
             for i in range(n_eval)]
    copies, truth = [], {}
    for j in range(n_copies):
        name, data = evals[int(rng.integers(n_eval))]
        out, text = copy_of(data, random_caption(rng), COPY_KINDS[j % len(COPY_KINDS)], rng)
        copies.append((f"e{j:07d}", out, text))
        truth[f"e{j:07d}"] = name
    return evals, copies, truth
