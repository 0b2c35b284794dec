"""Hashes for deduplication, and the grouping of duplicates.

- exact images: SHA-1 of the decoded RGB pixels and the size (re-encoding a file does not hide it);
- near-duplicate images: 64-bit perceptual hash (DCT of a 32x32 greyscale thumbnail, the 8x8
  lowest frequencies against their median) of the image and two central crops; pairs within
  Hamming distance k found through LSH tables (``hash_tables``: k+1 pigeonhole bands while
  buckets stay small, random bit-sampling tables beyond), never by comparing all pairs;
- captions: SHA-1 of the normalised text (case, punctuation and spacing removed) and a MinHash
  signature of its character 5-grams, with LSH banding (16 bands x 4 rows) for candidates and the
  estimated Jaccard similarity to confirm them.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from PIL import Image

from ..data.samples import normalise_caption

# ------------------------------------------------------------------------------------ images

_N = 32
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N))  # DCT-II basis


def pixel_hash(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha1(struct.pack("<II", *rgb.size) + rgb.tobytes()).hexdigest()


def phash64(image: Image.Image) -> int:
    """64-bit perceptual hash as an unsigned int."""
    grey = np.asarray(image.convert("L").resize((_N, _N), Image.Resampling.BILINEAR), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


CROP_VARIANTS = (0.0, 0.02, 0.04)  # fraction cut from each side before hashing


def phash_variants(image: Image.Image) -> list[int]:
    """pHash of the image and of two central crops (2% and 4% off each side).

    A plain pHash is robust to resizing and recompression but not to cropping a few pixels (the
    zoom shifts the DCT phases: distances up to 18 bits were measured for 2-5 px crops of 160 px
    images). Comparing every variant of one image with every variant of another makes a copy
    cropped by up to ~5% per side land within a few bits of one of the original's variants."""
    side = min(image.size)
    return [phash64(image.crop((f * side, f * side, image.width - f * side, image.height - f * side)) if f else image)
            for f in CROP_VARIANTS]


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def variant_distance(a: list[int], b: list[int]) -> int:
    return min(hamming(x, y) for x in a for y in b)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def hash_tables(n_entries: int, k: int, recall: float = 0.99, seed: int = 0) -> tuple[list[int], str]:
    """Bit masks of the LSH tables for Hamming distance <= k among ``n_entries`` 64-bit hashes.

    - ``bands``: k+1 disjoint bands (pigeonhole: every pair within k shares a band; exact), used
      while the buckets stay small (a band of 64/(k+1) bits has few values, so its buckets grow
      with the data and the candidate pairs quadratically);
    - ``sampled``: tables that each keep log2(entries)+3 random bits, enough tables for the given
      recall at distance k; buckets stay small at any size (pairs at distance d collide in one
      table with probability (1 - d/64) ** bits)."""
    band_bits = 64 // (k + 1)
    if n_entries <= 32 * 2 ** band_bits:
        edges = [round(i * 64 / (k + 1)) for i in range(k + 2)]
        return [((1 << (edges[i + 1] - edges[i])) - 1) << edges[i] for i in range(k + 1)], "bands"
    bits = min(64, int(np.ceil(np.log2(n_entries))) + 3)
    p = (1 - k / 64) ** bits
    n_tables = int(np.ceil(np.log(1 - recall) / np.log(1 - p)))
    rng = np.random.default_rng(seed)
    masks = [sum(1 << int(b) for b in rng.choice(64, bits, replace=False)) for _ in range(n_tables)]
    return masks, "sampled"


def near_pairs(hashes: np.ndarray, k: int, recall: float = 0.99) -> tuple[np.ndarray, np.ndarray, str]:
    """Item pairs (i < j) whose hash sets are within Hamming distance k (min over their variants).

    ``hashes``: [N, V] uint64 (V variants per item). Candidates come from LSH tables
    (``hash_tables``), found by sorting each table's keys, so nothing is compared all-pairs."""
    n, v = hashes.shape
    flat = hashes.reshape(-1)
    owner = np.repeat(np.arange(n, dtype=np.int64), v)
    masks, scheme = hash_tables(flat.size, k, recall)
    codes = []
    for mask in masks:
        keys = flat & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        lengths = np.diff(np.r_[starts, sorted_keys.size])
        two = starts[lengths == 2]  # most shared buckets hold two entries: pair them without a loop
        a, b = owner[order[two]], owner[order[two + 1]]
        a, b = np.minimum(a, b), np.maximum(a, b)
        codes.append((a * n + b)[a != b])
        for start, length in zip(starts[lengths > 2], lengths[lengths > 2]):
            members = np.unique(owner[order[start:start + length]])
            if members.size > 1:
                a, b = np.triu_indices(members.size, 1)
                codes.append(members[a] * n + members[b])
    if not codes:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, scheme
    pairs = np.unique(np.concatenate(codes))
    i, j = pairs // n, pairs % n
    keep = np.zeros(pairs.size, dtype=bool)
    for s in range(0, pairs.size, 1_000_000):  # verify in chunks: min distance over variant pairs
        x = hashes[i[s:s + 1_000_000], :, None] ^ hashes[j[s:s + 1_000_000], None, :]
        keep[s:s + 1_000_000] = _popcount(x).reshape(x.shape[0], -1).min(1) <= k
    return i[keep], j[keep], scheme


# ---------------------------------------------------------------------------------- captions

MINHASH_PERMUTATIONS = 64
MINHASH_BANDS = 16  # x 4 rows: pairs with Jaccard 0.8 become candidates with probability 0.9998
_PRIME = 4294967291  # largest prime below 2**32
_rng = np.random.default_rng(20240229)
_A = _rng.integers(1, _PRIME, MINHASH_PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, MINHASH_PERMUTATIONS, dtype=np.uint64)


def caption_hash(text: str) -> str:
    return hashlib.sha1(normalise_caption(text).encode()).hexdigest()


def minhash(text: str, n: int = 5) -> np.ndarray:
    """MinHash signature [64] uint32 of the normalised caption's character n-grams."""
    norm = normalise_caption(text)
    grams = {norm[i:i + n] for i in range(max(1, len(norm) - n + 1))}
    h = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams],
                 dtype=np.uint64)
    return ((h[:, None] * _A[None, :] + _B[None, :]) % _PRIME).min(axis=0).astype(np.uint32)


def minhash_bands(signature: np.ndarray) -> list[tuple[int, bytes]]:
    rows = len(signature) // MINHASH_BANDS
    return [(b, signature[b * rows:(b + 1) * rows].tobytes()) for b in range(MINHASH_BANDS)]


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


# ---------------------------------------------------------------------------------- grouping

class UnionFind:
    """Duplicate groups; the representative is always the smallest member (first in input order)."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.reason: dict[int, str] = {}

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int, reason: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        keep, drop = min(ra, rb), max(ra, rb)
        self.parent[drop] = keep
        self.reason[drop] = reason  # every item that stops being a root is dropped exactly once


def candidate_pairs(keys: Iterable[tuple[int, object]]) -> Iterable[tuple[int, int]]:
    """Pairs (i, j), i < j, of items that share a bucket; ``keys`` yields (item, bucket key)."""
    buckets: dict[object, list[int]] = defaultdict(list)
    for item, key in keys:
        buckets[key].append(item)
    seen = set()
    for members in buckets.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                pair = (members[x], members[y]) if members[x] < members[y] else (members[y], members[x])
                if pair not in seen:
                    seen.add(pair)
                    yield pair
