"""A planted-duplicates dataset for measuring deduplication (tests and benchmarks/prepare.py).

Distinct "photos" (random gradients, shapes and noise; no two alike) with distinct captions, plus
copies of some of them: byte-exact copies, resized, recompressed at low JPEG quality, and cropped
by a few pixels, each with its caption's case or punctuation changed. The truth is which sample
copies which.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image, ImageDraw

WORDS = ("red blue green yellow small large old new wooden metal bright dark happy quiet busy empty "
         "dog cat house tree car boat street river mountain city beach garden kitchen window table "
         "woman man child bird horse flower bridge train road field sky cloud lamp chair book").split()
COPY_KINDS = ("exact", "resized", "recompressed", "cropped")


def random_photo(seed: int, size: int = 224) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(0, 255) * (1 - x) * rng.uniform(0.3, 1) + rng.uniform(0, 255) * y
                     for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(10, 20))):  # many shapes of varied brightness: distinct layouts in grey
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.4, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        box = (x0, y0, x0 + w, y0 + h)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(3, 15)))
    return img


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
    variant = int(rng.integers(3))
    text = caption.upper() if variant == 0 else caption.capitalize() + "." if variant == 1 else caption + "!!"
    return out, text


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


def synthetic_hash_records(work, n: int, n_tasks: int, seed: int = 0, variants: int = 3, captions: bool = False,
                           chain_length: int = 4) -> dict:
    """Filter-stage output (``work/filter/task_N/meta.parquet``) of ``n`` samples with random hashes
    and planted duplicates, to measure and test stage 2 without images. Of every 20 samples: one
    exact copy (same pixel hash and pHashes) of one of the first n/40 samples, two near copies (each variant 1-3 bits away) and one
    link of a chain — a run of ``chain_length`` samples, each 3 bits from the previous, so that
    its ends are farther apart than the threshold and only connected components join them. With
    ``captions``, one in 20 captions is a near copy (8 of 64 MinHash values changed) of another.
    Returns counts of what was planted."""
    from pathlib import Path

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

    exact = np.flatnonzero(slot == 0)  # copies of a few popular pictures: groups of 2-4 copies
    popular = source[exact] % max(1, n // 40)
    hashes[exact], sha[exact] = hashes[popular], sha[popular]
    near = np.flatnonzero((slot == 1) | (slot == 2))
    hashes[near] = flip(source[near], int(rng.integers(1, 4)))
    links = np.flatnonzero(slot == 3)
    for c in range(0, links.size - chain_length + 1, chain_length):  # chain: each link 3 bits from the last
        for a, b in zip(links[c:c + chain_length - 1], links[c + 1:c + chain_length]):
            hashes[b] = hashes[a]
            for v in range(variants):
                for bit in rng.choice(64, 3, replace=False):
                    hashes[b, v] ^= np.uint64(1) << np.uint64(bit)
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
        uid = [f"{t:06d}{r:07d}" for r in range(rows)]
        table = pa.table({
            "uid": uid, "key": [f"s{lo + r}" for r in range(rows)], "source": [f"synthetic:{lo + r}" for r in range(rows)],
            "width": pa.array(np.full(rows, 224, np.int32)), "height": pa.array(np.full(rows, 224, np.int32)),
            "caption": [""] * rows, "pixel_sha1": [bytes(x).hex() for x in sha[lo:hi]],
            "phash": pa.ListArray.from_arrays(np.arange(0, rows * variants + 1, variants, dtype=np.int32),
                                              pa.array(signed[lo:hi].reshape(-1))),
            "caption_sha1": [bytes(x).hex() for x in cap_sha[lo:hi]],
            "minhash": pa.ListArray.from_arrays(
                np.arange(0, rows * 64 + 1, 64, dtype=np.int32) if captions else np.zeros(rows + 1, np.int32),
                pa.array(sigs[lo:hi].reshape(-1) if captions else np.zeros(0, np.uint32), pa.uint32())),
        })
        d = Path(work) / "filter" / f"task_{t:06d}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, d / "meta.parquet")
    return {"samples": n, "exact_copies": int(exact.size), "near_copies": int(near.size), "chain_links": int(links.size)}


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
