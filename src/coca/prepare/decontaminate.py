"""Evaluation-set decontamination for `coca data prepare` (``dedup.against``).

The evaluation images (for example an ImageNet validation folder, or the COCO Karpathy test
images) are hashed once, before stage 1, with the hashes near-deduplication uses: the pHash of
the image and of its two central crops. Every filter task then checks each sample that passed
its filters against them. A sample with a variant pair within ``dedup.phash_max_distance`` of an
evaluation image's (identical pixels always are) is rejected with reason ``eval_overlap`` and the
evaluation file it matched (the first in the evaluation list, when several match).

The index is small next to the training set (50,000 ImageNet validation images are 150,000
hashes), so every worker holds it whole and the check needs no shuffle: it runs inside the filter
tasks, identically on every engine. Near matches are found through LSH tables over the
evaluation hashes sized for their count (``hashing.hash_tables``): pigeonhole bands (exact)
while buckets are small, random bit samples with 0.99 recall at distance k beyond.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data.samples import Skipped, decode_image
from ..errors import UserError
from ..io import atomic_write_bytes
from .hashing import PHASH_VARIANTS, hash_tables, image_hashes, phash64, popcount

INDEX_FILE = "against.npz"
CHUNK = 256  # evaluation images per hashing task


def hash_eval_chunk(paths: list[str], max_pixels: int) -> list[tuple[str, list[int]] | str]:
    """(path, pHash variants) of each image (as training samples get them, ``image_hashes``), or the
    reason it could not be read."""
    out = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            out.append(f"{path}: {e.strerror or e}")
            continue
        image = decode_image(data, max_pixels, path)
        if isinstance(image, Skipped):
            out.append(f"{path}: {image.reason}")
        else:
            hashes = image_hashes(image, 0.0)  # a blank evaluation image still gets its plain pHash
            out.append((path, hashes["phash"] if hashes else [phash64(image)] * PHASH_VARIANTS))
    return out


def build_eval_index(against: list[str], work: Path, max_pixels: int, run, log) -> dict:
    """Hash the evaluation images into ``work/against.npz`` once (kept for reruns); returns counts."""
    import functools

    from ..caption_files import collect_image_paths
    out = work / INDEX_FILE
    if out.is_file():
        with np.load(out) as index:
            return {"images": int(index["paths"].size), "unreadable": int(index["unreadable"])}
    paths = collect_image_paths(against)  # a missing path or one with no images is an error here
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results = [r for chunk in run(functools.partial(hash_eval_chunk, max_pixels=max_pixels), chunks,
                                  "hash evaluation images") for r in chunk]
    good = [r for r in results if not isinstance(r, str)]
    bad = [r for r in results if isinstance(r, str)]
    for reason in bad[:5]:
        log(f"warning: evaluation image not used: {reason}")
    if bad:
        log(f"warning: {len(bad)} of {len(paths)} evaluation images could not be read")
    if not good:
        raise UserError(f"dedup.against: none of the {len(paths)} evaluation images could be read "
                        f"(first: {bad[0] if bad else '-'})")
    buf = io.BytesIO()
    np.savez(buf, paths=np.array([p for p, _ in good]), phash=np.array([h for _, h in good], dtype=np.uint64), unreadable=np.array(len(bad)))
    atomic_write_bytes(out, buf.getvalue())
    log(f"{len(good)} evaluation images hashed for decontamination")
    return {"images": len(good), "unreadable": len(bad)}


class EvalIndex:
    """Lookup of a sample's hashes among the evaluation images'."""

    def __init__(self, path: Path, k: int):
        with np.load(path) as index:
            self.paths = index["paths"].tolist()
            self.phash = index["phash"]  # [m, V] uint64
        self.k = k
        self.masks, _ = hash_tables(self.phash.size, k)
        rows = self.phash.tolist()
        self.tables = []
        for mask in self.masks:
            table = defaultdict(list)
            for i, row in enumerate(rows):
                for h in row:
                    table[h & mask].append(i)
            self.tables.append({key: np.unique(items) for key, items in table.items()})

    def match(self, phash: list[int]) -> str | None:
        """The first evaluation file within distance k of this sample's pHash variants, or None.
        (Identical pixels have identical hashes, which collide in every table.)"""
        found = [c for mask, table in zip(self.masks, self.tables) for h in phash
                 if (c := table.get(h & mask)) is not None]
        if not found:
            return None
        candidates = np.unique(np.concatenate(found))
        mine = np.array(phash, dtype=np.uint64)
        distance = popcount(self.phash[candidates][:, :, None] ^ mine[None, None, :])
        hits = candidates[distance.reshape(candidates.size, -1).min(1) <= self.k]
        return self.paths[hits[0]] if hits.size else None


_indexes: dict[tuple[str, int], EvalIndex] = {}


def eval_index(work: str, k: int) -> EvalIndex | None:
    """The job's evaluation index, loaded once per worker process; None without ``dedup.against``."""
    path = Path(work) / INDEX_FILE
    if not path.is_file():
        return None
    if (str(path), k) not in _indexes:
        _indexes[(str(path), k)] = EvalIndex(path, k)
    return _indexes[(str(path), k)]
