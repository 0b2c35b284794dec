"""Hashes for deduplication, and the grouping of duplicates.

- exact images: SHA-1 of the decoded RGB pixels and the size (re-encoding a file does not hide it);
- near-duplicate images: 64-bit perceptual hash (DCT of a 32x32 greyscale thumbnail, the 8x8
  lowest frequencies against their median) of the picture without its uniform borders
  (``content_box``: letterbox and pillarbox bars, padding) and of two central crops of it, plus
  the untrimmed picture's; pairs within Hamming distance k found through LSH tables
  (``hash_tables``: k+1 pigeonhole bands while buckets stay small, random bit-sampling tables
  beyond), never by comparing all pairs;
- overlays (a watermark or logo in a corner, a caption bar): pHashes of 9 overlapping regions;
  two pictures whose centre region and at least 5 of the 9 agree within 4 bits (by default) are
  near duplicates (``regions_agree``), found through LSH tables on the centre region;
- captions: SHA-1 of the normalised text (case, punctuation and spacing removed) and a MinHash
  signature of its character 5-grams, with LSH banding (16 bands x 4 rows) for candidates and the
  estimated Jaccard similarity to confirm them;
- buckets to edges, shared by the single-process and the partitioned deduplication: exact groups
  as stars (``star_edges``), LSH buckets verified pair by pair after collapsing identical
  signatures (``verified_edges``), each LSH table's bucket packed into one uint64
  (``lsh_bucket``) so that one sort finds them.
"""

from __future__ import annotations

import functools
import hashlib
import struct

import numpy as np
from PIL import Image, ImageStat

from ..data.samples import normalise_caption

# ------------------------------------------------------------------------------------ images

_N = 32
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N))  # DCT-II basis


def pixel_hash(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha1(struct.pack("<II", *rgb.size) + rgb.tobytes()).hexdigest()


def _phash_blocks(grey: np.ndarray) -> list[int]:
    """64-bit pHashes of [k, 32, 32] greyscale blocks: the 8 x 8 lowest DCT frequencies of each
    against their median (all blocks in one batched product; the median by partition, as
    ``np.median`` computes it, without its per-call overhead)."""
    low = (_DCT @ grey @ _DCT.T)[:, :8, :8].reshape(len(grey), 64)
    middle = np.partition(low, (31, 32), axis=1)
    bits = low > ((middle[:, 31] + middle[:, 32]) / 2)[:, None]
    return [int(x) for x in np.packbits(bits, axis=1).view(">u8")[:, 0]]


def _thumbnail(grey: Image.Image, side: int = _N) -> np.ndarray:
    # reducing_gap: a box reduction by an integer factor first, then bilinear (the same picture, faster)
    return np.asarray(grey.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.float64)


def phash64(image: Image.Image) -> int:
    """64-bit perceptual hash as an unsigned int."""
    return _phash_blocks(_thumbnail(image.convert("L"))[None])[0]


CROP_VARIANTS = (0.0, 0.02, 0.04)  # fraction cut from each side before hashing
PHASH_VARIANTS = len(CROP_VARIANTS) + 1  # per sample: the crops of the trimmed picture, the untrimmed one


def phash_variants(image: Image.Image) -> list[int]:
    """pHash of the image and of two central crops (2% and 4% off each side).

    A plain pHash is robust to resizing and recompression but not to cropping a few pixels (the
    zoom shifts the DCT phases: distances up to 18 bits were measured for 2-5 px crops of 160 px
    images). Comparing every variant of one image with every variant of another makes a copy
    cropped by up to ~5% per side land within a few bits of one of the original's variants."""
    grey = image if image.mode == "L" else image.convert("L")
    side = min(grey.size)
    return _phash_blocks(np.stack([
        _thumbnail(grey.crop((f * side, f * side, grey.width - f * side, grey.height - f * side)) if f else grey)
        for f in CROP_VARIANTS]))


TRIM_ANALYSIS_SIDE = 128  # borders are found on a copy at most this large (a box-filter reduction)
TRIM_MAX_STD = 8.0        # a border row or column: standard deviation of its grey levels at most this,
TRIM_MAX_STEP = 6.0       # and its mean within this of the line before it (a bar does not change colour)
TRIM_MAX_DRIFT = 12.0     # and of the outermost line (a smooth gradient across the picture is content)


def _mean_std_over_first_axis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a.mean(0), a.std(0)`` for a C-contiguous [n, m] float32 array, faster (no centred
    temporary; reducing the first axis of a contiguous array is vectorised)."""
    mean = a.sum(0) / a.shape[0]
    return mean, np.sqrt(np.maximum(np.einsum("nm,nm->m", a, a) / a.shape[0] - mean * mean, 0))


def _border_lines(mean: np.ndarray, std: np.ndarray) -> tuple[int, int]:
    """How many lines from the start and from the end are border: close to constant, each within
    ``TRIM_MAX_STEP`` of the previous one's mean and ``TRIM_MAX_DRIFT`` of the outermost one's, so
    that trimming stops at the first edge of the content even where the content is flat (a solid
    shape's columns are constant too) or changes smoothly (a gradient's columns are constant too)."""
    def run(m, s):  # [lines] or [lines, channels]
        ok = (s <= TRIM_MAX_STD) & (np.abs(m - m[:1]) <= TRIM_MAX_DRIFT)
        ok[1:] &= np.abs(np.diff(m, axis=0)) <= TRIM_MAX_STEP
        ok = ok if ok.ndim == 1 else ok.all(1)
        return len(ok) if ok.all() else int(np.argmin(ok))
    return run(mean, std), run(mean[::-1], std[::-1])


def content_box(image: Image.Image, min_content: float = 0.1,
                grey: Image.Image | None = None) -> tuple[int, int, int, int] | None:
    """The picture without uniform borders: (left, top, right, bottom) in ``image``'s pixels, or
    None when less than ``min_content`` of a side is left (a blank or near-blank image).

    A border row is close to constant along its length (the standard deviation of its grey levels
    is at most ``TRIM_MAX_STD``) and continues the colour of the row outside it (means within
    ``TRIM_MAX_STEP``), which holds for bars of any colour after JPEG
    compression and resizing, and for blurred padding that is close to constant. Rows are trimmed
    from the top and bottom first, then columns from the sides, measured over the rows that are
    left (so letterbox bars do not lower every column's deviation). A near-constant band inside a
    picture (a clear sky at the top) is trimmed too, the same way in every copy of it, which is all
    the hashes need; a picture whose content is trimmed away entirely (a flat block flush with an
    edge looks like a border) is kept whole. Grey levels decide, as the hashes see only them; a
    picture whose grey levels are close to constant everywhere is measured again in its colour channels (a yellow shape on
    light grey has the luminance of its background) and is kept, untrimmed, when it has content
    there (``colour_only``). ``grey``: ``image`` in grey levels, when the caller has it already."""
    return _box_and_kind(image, min_content, grey)[0]


def _box_and_kind(image: Image.Image, min_content: float,
                  grey: Image.Image | None) -> tuple[tuple[int, int, int, int] | None, bool]:
    """``content_box`` and whether the picture's content is in its colour channels only."""
    w, h = image.size
    factor = max(1, -(-max(w, h) // TRIM_ANALYSIS_SIDE))

    def pixels(im):  # the analysis copy: at most TRIM_ANALYSIS_SIDE px a side
        return np.asarray(im.reduce(factor) if factor > 1 else im, dtype=np.float32)

    grey = pixels(grey if grey is not None else image if image.mode == "L" else image.convert("L"))
    box = _content_box(grey, min_content)
    if box is None:
        if float(grey.std()) > TRIM_MAX_STD:  # content in grey: too little of it left, or all of it trimmed
            # away as border (a flat block flush with an edge: its lines are constant and continue
            # the outermost one), which is content all the same: kept whole
            return ((0, 0, w, h) if _content_box(grey, 0.0) is None else None), False
        colour_only = image.mode != "L" and _content_box(pixels(image.convert("RGB")), min_content) is not None
        return ((0, 0, w, h) if colour_only else None), colour_only
    scale_x, scale_y = w / grey.shape[1], h / grey.shape[0]
    left, top, right, bottom = box
    return (round(left * scale_x), round(top * scale_y), round(right * scale_x), round(bottom * scale_y)), False


def chroma(image: Image.Image) -> Image.Image:
    """The colour-difference channel (Cb or Cr) in which the picture varies most, as a grey image:
    what the hashes look at when the grey levels are blank (every copy picks the same channel)."""
    return max(image.convert("YCbCr").split()[1:], key=lambda c: ImageStat.Stat(c).stddev[0])


def _content_box(a: np.ndarray, min_content: float) -> tuple[int, int, int, int] | None:
    """``content_box`` in the pixels of a [height, width] or [height, width, channels] array: a
    border line meets the rules in every channel."""
    sh, sw = a.shape[:2]

    def lines(block):  # [along, lines(, channels)] -> each line's (channels') means and deviations
        mean, std = _mean_std_over_first_axis(np.ascontiguousarray(block).reshape(block.shape[0], -1))
        return (mean, std) if block.ndim == 2 else (mean.reshape(block.shape[1], -1), std.reshape(block.shape[1], -1))

    top, from_bottom = _border_lines(*lines(a.swapaxes(0, 1)))  # rows
    bottom = max(top, sh - from_bottom)
    if bottom - top < max(2, min_content * sh):
        return None
    left, from_right = _border_lines(*lines(a[top:bottom]))  # columns over the rows kept
    right = max(left, sw - from_right)
    if right - left < max(2, min_content * sw):
        return None
    return left, top, right, bottom


REGION_GRID = 3  # regions per side: overlapping windows of half the side, a quarter apart
CENTRE_REGION = REGION_GRID * REGION_GRID // 2


def region_hashes(image: Image.Image) -> list[int]:
    """pHashes of REGION_GRID x REGION_GRID overlapping regions (each half the width and height,
    starting at 0, 1/4 and 1/2 of the side), row by row: an overlay in a corner changes the corner
    regions and leaves the others."""
    grey = _thumbnail(image if image.mode == "L" else image.convert("L"), 2 * _N)
    step = _N // 2
    return _phash_blocks(np.stack([grey[r * step:r * step + _N, c * step:c * step + _N]
                                   for r in range(REGION_GRID) for c in range(REGION_GRID)]))


def image_hashes(image: Image.Image, min_content: float = 0.1) -> dict | None:
    """Everything near-duplicate detection keeps of a picture, or None when it has no content:

    - ``phash``: ``phash_variants`` of the picture without its borders (``content_box``), then the
      untrimmed picture's own pHash (the same as the first when there was nothing to trim);
    - ``regions``: ``region_hashes`` of the untrimmed picture (overlays change some regions, a
      border would shift them all, so borders are the trimmed variants' job);
    - ``content_box``: where the content is, (left, top, right, bottom).

    A picture with content in its colour channels only is hashed in its ``chroma`` channel."""
    grey = image.convert("L")
    box, colour_only = _box_and_kind(image, min_content, grey)
    if box is None:
        return None
    if colour_only:  # blank grey levels would give every such picture the same hashes
        grey = chroma(image)
    trimmed = box != (0, 0, image.width, image.height)
    variants = phash_variants(grey.crop(box) if trimmed else grey)
    return {"phash": variants + [phash64(grey) if trimmed else variants[0]], "regions": region_hashes(grey),
            "content_box": list(box)}


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def variant_distance(a: list[int], b: list[int]) -> int:
    return min(hamming(x, y) for x in a for y in b)


def popcount(x: np.ndarray) -> np.ndarray:
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


def lsh_bucket(hashes: np.ndarray, masks: list[int], table: int) -> np.ndarray:
    """The bucket of every hash (any shape) in LSH table ``table`` of ``masks``, as one uint64 that
    no other table's buckets share: the table number above the bits the table keeps, packed."""
    bits = [i for i in range(64) if masks[table] >> i & 1]
    shift = max(bin(m).count("1") for m in masks)
    if shift + (len(masks) - 1).bit_length() > 64:
        raise ValueError(f"{len(masks)} tables of {shift} bits do not fit a 64-bit bucket")
    out = np.zeros(hashes.shape, np.uint64)
    for j, bit in enumerate(bits):  # gather the kept bits (a vectorised PEXT)
        out |= ((hashes >> np.uint64(bit)) & np.uint64(1)) << np.uint64(j)
    return out | (np.uint64(table) << np.uint64(shift)) if table else out


def near_pairs(hashes: np.ndarray, k: int, recall: float = 0.99) -> tuple[np.ndarray, np.ndarray, str]:
    """Edges (i < j) between items whose hash sets are within Hamming distance k (min over their
    variants), enough to give the same connected components as all such pairs.

    ``hashes``: [N, V] uint64 (V variants per item). Candidates come from LSH tables
    (``hash_tables``), found by sorting each table's keys, so nothing is compared all-pairs; items
    with identical hash sets are linked in a star rather than pairwise (``verified_edges``)."""
    n, v = hashes.shape
    owner = np.repeat(np.arange(n, dtype=np.int64), v)
    masks, scheme = hash_tables(n * v, k, recall)
    i, j = _lsh_edges(hashes.reshape(-1), owner, masks, lambda idx: hashes[owner[idx]],
                      functools.partial(within_distance, k=k))
    return i, j, scheme


def _lsh_edges(keys: np.ndarray, owner: np.ndarray, masks: list[int], signature, close) -> tuple[np.ndarray, np.ndarray]:
    """Unique verified edges over every LSH table of ``masks`` (``verified_edges`` per table)."""
    edges = [verified_edges([lsh_bucket(keys, masks, t)], owner, signature, close) for t in range(len(masks))]
    return unique_edges(np.concatenate([e[0] for e in edges] or [np.zeros(0, np.int64)]),
                        np.concatenate([e[1] for e in edges] or [np.zeros(0, np.int64)]))


def regions_agree(a: np.ndarray, b: np.ndarray, k: int, min_agree: int) -> np.ndarray:
    """[M] bool: region hashes a[m] and b[m] ([M, 9] each) have their centre and at least
    ``min_agree`` regions (the centre among them) within distance k of each other."""
    close = popcount(a ^ b) <= k
    return close[:, CENTRE_REGION] & (close.sum(1) >= min_agree)


def region_pairs(regions: np.ndarray, k: int, min_agree: int, recall: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i < j) between pictures whose regions agree (``regions_agree``): candidates share an
    LSH bucket of their centre regions (tables for distance k), then are verified."""
    masks, _ = hash_tables(regions.shape[0], k, recall)
    return _lsh_edges(regions[:, CENTRE_REGION], np.arange(regions.shape[0], dtype=np.int64), masks,
                      lambda idx: regions[idx], functools.partial(regions_agree, k=k, min_agree=min_agree))


def within_distance(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """[M] bool: the hash sets a[m] and b[m] ([M, V] each) have a variant pair within distance k."""
    x = a[:, :, None] ^ b[:, None, :]
    return popcount(x).reshape(x.shape[0], x.shape[1] * x.shape[2]).min(1, initial=64) <= k


# --------------------------------------------------------------------------------- buckets

def _runs(columns: list[np.ndarray], owner: np.ndarray, tie: np.ndarray | None = None,
          same: np.ndarray | None = None):
    """Record order sorted by (columns..., tie, owner), and the start and length of each run of
    records equal in every column (a bucket) and, if given, in every column of ``same`` ([M, C]).
    ``tie`` (a fingerprint of ``same``) only makes equal rows of ``same`` adjacent."""
    order = np.lexsort([owner, *([] if tie is None else [tie]), *reversed(columns)])
    change = np.zeros(owner.size, dtype=bool)
    change[:1] = True
    for column in columns:
        s = column[order]
        change[1:] |= s[1:] != s[:-1]
    if same is not None:
        s = same[order]
        change[1:] |= np.any(s[1:] != s[:-1], axis=1)
    starts = np.flatnonzero(change)
    return order, starts, np.diff(np.r_[starts, owner.size])


def _in_shared_buckets(columns: list[np.ndarray]) -> np.ndarray:
    """Indices of the records whose bucket holds another record. Most LSH buckets hold one, so
    one plain sort here spares the multi-key sorts of everything after."""
    if len(columns) == 1:
        order = np.argsort(columns[0])
        s = columns[0][order]
    else:
        order = np.lexsort(list(reversed(columns)))
        s = np.rec.fromarrays([c[order] for c in columns])
    same = s[1:] == s[:-1]
    return np.sort(order[np.r_[same, False] | np.r_[False, same]])


def star_edges(columns: list[np.ndarray], owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact groups: an edge from the smallest owner of each bucket to every other owner in it."""
    shared = _in_shared_buckets(columns)
    columns, owner = [c[shared] for c in columns], owner[shared]
    order, starts, lengths = _runs(columns, owner)
    first = np.repeat(owner[order[starts]], lengths)
    other = owner[order]
    keep = other != first
    return unique_edges(first[keep], other[keep])


def verified_edges(columns: list[np.ndarray], owner: np.ndarray, signature, close) -> tuple[np.ndarray, np.ndarray]:
    """Edges (a < b) between owners that share a bucket and whose signatures are ``close``.

    ``signature(record indices)`` gives the records' signatures ([M, ...]); ``close(sa, sb)`` -> [M]
    bool. Within a bucket, owners with identical signatures are first linked in a star to the
    smallest of them, and only one per distinct signature is compared pairwise: a picture copied
    100,000 times makes one bucket of 100,000 in every table, which pairwise would be 5e9
    comparisons. The components are the same as with every close pair. All of it is vectorised:
    pairs at distance d within a bucket are formed for d = 1, 2, ... over the buckets longer than d."""
    shared = _in_shared_buckets(columns)
    columns, owner, sig = [c[shared] for c in columns], owner[shared], signature(shared)
    flat = sig.reshape(owner.size, int(np.prod(sig.shape[1:])))
    fingerprint = np.zeros(owner.size, np.uint64)
    for column in flat.T:
        fingerprint = mix64(fingerprint ^ column.astype(np.uint64))
    order, starts, lengths = _runs(columns, owner, fingerprint, flat)  # identical copies within a bucket
    leader = np.repeat(order[starts], lengths)
    linked = owner[leader] != owner[order]
    out_a, out_b = [owner[leader[linked]]], [owner[order[linked]]]
    leaders = order[starts]  # one record per distinct signature and bucket, its smallest owner
    order, starts, lengths = _runs([c[leaders] for c in columns], owner[leaders])
    records = leaders[order]
    run_end = np.repeat(starts + lengths, lengths)
    i = np.arange(records.size)
    for d in range(1, int(lengths.max(initial=1))):
        i = i[i + d < run_end[i]]  # positions with a partner d further in the same bucket
        a, b = records[i], records[i + d]
        ok = close(sig[a], sig[b])
        out_a.append(owner[a[ok]])
        out_b.append(owner[b[ok]])
    return unique_edges(np.concatenate(out_a), np.concatenate(out_b))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    x = x.copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def unique_edges(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each undirected edge once, as (smaller, larger), sorted."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if lo.size == 0:
        return lo.astype(np.int64), hi.astype(np.int64)
    order = np.lexsort([hi, lo])
    lo, hi = lo[order], hi[order]
    keep = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    return lo[keep], hi[keep]


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


def minhash_band_keys(signatures: np.ndarray) -> np.ndarray:
    """[N, MINHASH_BANDS] band keys (16 bytes each) of [N, 64] signatures."""
    rows = signatures.shape[1] // MINHASH_BANDS
    return np.ascontiguousarray(signatures).view(f"S{4 * rows}").reshape(len(signatures), MINHASH_BANDS)


def near_captions(signatures: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i < j) between captions whose estimated Jaccard is >= threshold, from LSH bands."""
    n = len(signatures)
    owner = np.repeat(np.arange(n, dtype=np.int64), MINHASH_BANDS)
    band = np.tile(np.arange(MINHASH_BANDS, dtype=np.uint8), n)
    return verified_edges([band, minhash_band_keys(signatures).reshape(-1)], owner, lambda idx: signatures[owner[idx]],
                          functools.partial(similar_captions, threshold=threshold))


def similar_captions(a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    return (a == b).sum(1) / a.shape[1] >= threshold if len(a) else np.zeros(0, dtype=bool)


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
