"""Stage 2 of `coca data prepare`: duplicate groups, in one process or partitioned over workers.

Both paths give the same result, defined so that it does not depend on the order in which pairs
are found. Sample ids are the uids, in input order. Edges join duplicates:

- exact: samples with the same pixel hash, as a star around the first of them;
- near images: pHash sets within ``phash_max_distance`` that share a bucket of an LSH table, or
  region hashes that agree (``hashing.regions_agree``: overlays) and share a bucket of an LSH
  table on the centre region;
- semantic (optional, ``semantic_model``): image embeddings with cosine >= ``semantic_threshold``
  within a k-means cluster (``semantic``);
- captions (optional): the same normalised caption, or MinHash Jaccard >= ``caption_jaccard``
  within a shared LSH band.

Each connected component keeps its smallest id (first in input order); every other member is
recorded with that id as ``duplicate_of`` and the reason of the first kind of edge that joined it:
``duplicate_exact`` if it is not first in its exact group, else ``duplicate_near_image`` if it is
not the smallest of its component under exact and near edges, else ``duplicate_semantic`` if it
is not the smallest under those and semantic edges, else ``duplicate_caption``. A semantic
duplicate's ``similarity`` is its highest cosine to another sample (None for one that joined
through a near copy of itself, with no semantic link of its own).

The partitioned path (``engine: ray``, or ``dedup.partitioned: true``) never holds all samples in
one process. Each pass is a set of tasks that write files and finish with a rename, so a rerun
redoes only unfinished tasks (``OUT/_work/dedup/``):

1. emit, one task per filter task: each sample's keys (pixel hash; one LSH key per table and hash
   variant, carrying the sample's hashes for verification; one per region table, carrying its
   region hashes; its embedding under its k-means cluster; caption hash; MinHash bands) go to P
   key partitions, as one file sorted by partition plus offsets;
2. buckets, one task per key partition: star edges of exact groups, verified edges of LSH and
   MinHash buckets (``hashing.verified_edges``), semantic edges within each cluster. Edges go to node partitions — a node's partition
   is that of its filter task's range, so a task's labels end up in one file — in both directions;
3. connected components, one task per node partition and round: alternating large-star and
   small-star rounds (Kiveris et al., "Connected Components in MapReduce and Beyond", 2014) until
   every component is a star around its smallest node, which each task checks on its own nodes;
   O(log^2 n) rounds, each task holding only its partition's edges;
4. labels, one task per node partition: ``duplicate_of`` and the reason of each duplicate.

The driver then writes ``dedup.parquet`` exactly as the single-process path does.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes, commit_dir
from . import semantic as sem
from .config import PrepareConfig
from .hashing import (
    CENTRE_REGION,
    MINHASH_BANDS,
    UnionFind,
    hash_tables,
    lsh_bucket,
    minhash_band_keys,
    mix64,
    near_captions,
    near_pairs,
    region_pairs,
    regions_agree,
    similar_captions,
    star_edges,
    unique_edges,
    verified_edges,
    within_distance,
)
from .layout import UID_DIGITS, WorkLayout


class Reason(IntEnum):
    """Why a sample is a duplicate: its code in the partitioned path's ``labels.npy``, and its
    ``reason`` in ``dedup.parquet`` (``label``)."""

    EXACT = 0
    NEAR_IMAGE = 1
    CAPTION = 2
    SEMANTIC = 3

    @property
    def label(self) -> str:
        return f"duplicate_{self.name.lower()}"


REASONS = tuple(r.label for r in Reason)  # by code
MAX_CC_ROUNDS = 200


def meta_columns(cfg: PrepareConfig) -> list[str]:
    return (["uid", "key", "source", "pixel_sha1", "phash"] + (["regions"] if _regions_on(cfg) else [])
            + (["caption_sha1", "minhash"] if cfg.dedup.captions else []))


def _regions_on(cfg: PrepareConfig) -> bool:
    return cfg.dedup.near_images and cfg.dedup.region_min_agree > 0


# ------------------------------------------------------------------------ single process

def find_duplicates(meta, cfg: PrepareConfig, semantic_edges=None) -> tuple[list, list, list]:
    """For rows in input order: (index of the kept row each duplicate belongs to, or None; reason;
    similarity, for semantic duplicates). ``semantic_edges``: (a, b, cosine) by row index."""
    d = cfg.dedup
    n = len(meta["uid"])
    uf = UnionFind(n)
    stages = []
    if d.exact_images and n:
        keys = np.array([bytes.fromhex(h) for h in meta["pixel_sha1"]], dtype="S20")
        stages.append((Reason.EXACT.label, star_edges([keys], np.arange(n))))
    if d.near_images and n:
        hashes = np.asarray(meta["phash"]).view(np.uint64)  # stored as signed int64
        a, b, _ = near_pairs(hashes, d.phash_max_distance)
        if _regions_on(cfg):
            ra, rb = region_pairs(np.asarray(meta["regions"]).view(np.uint64), d.region_max_distance,
                                  d.region_min_agree)
            a, b = unique_edges(np.r_[a, ra], np.r_[b, rb])
        stages.append((Reason.NEAR_IMAGE.label, (a, b)))
    best = {}
    if semantic_edges is not None:
        stages.append((Reason.SEMANTIC.label, semantic_edges[:2]))
        best = dict(zip(*(x.tolist() for x in sem.best_similarity(*semantic_edges))))
    if d.captions and n:
        keys = np.array([bytes.fromhex(h) for h in meta["caption_sha1"]], dtype="S20")
        exact = star_edges([keys], np.arange(n))
        near = near_captions(np.asarray(meta["minhash"], dtype=np.uint32), d.caption_jaccard)
        stages.append((Reason.CAPTION.label, unique_edges(np.r_[exact[0], near[0]], np.r_[exact[1], near[1]])))
    for reason, (a, b) in stages:
        for i, j in zip(a.tolist(), b.tolist()):
            uf.union(i, j, reason)
    rep = [uf.find(i) for i in range(n)]
    reasons = [uf.reason.get(i) if rep[i] != i else None for i in range(n)]
    return ([r if r != i else None for i, r in enumerate(rep)], reasons,
            [best.get(i) if why == Reason.SEMANTIC.label else None for i, why in enumerate(reasons)])


def read_meta(path, columns: list[str]) -> dict:
    """Columns of a filter task's ``meta.parquet``: ``phash`` as [n, V] and ``regions`` as [n, 9]
    uint64 and ``minhash`` as [n, 64] uint32 arrays, ``uid`` as fixed-width bytes, the others as lists."""
    import pyarrow.parquet as pq
    table = pq.read_table(path, columns=columns)
    out = {}
    for name in columns:
        column = table.column(name).combine_chunks()
        if name in ("phash", "regions", "minhash"):
            values = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = values.astype(np.uint32) if name == "minhash" else values.view(np.uint64)
            out[name] = out[name].reshape(len(table), -1) if len(table) else out[name].reshape(0, 1)
        elif name == "uid":
            out[name] = np.array(column.to_pylist(), dtype=f"S{UID_DIGITS}")
        else:
            out[name] = column.to_pylist()
    return out


def write_dedup_table(path: Path, uid: list, key: list, source: list, duplicate_of: list, reason: list,
                      similarity: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"uid": uid, "key": key, "source": source, "duplicate_of": duplicate_of, "reason": reason,
            "similarity": [None if x is None else round(float(x), 6) for x in similarity]}
    schema = pa.schema([(c, pa.float64() if c == "similarity" else pa.string()) for c in rows])
    buf = io.BytesIO()
    pq.write_table(pa.table(rows, schema=schema), buf)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------ partitioned

@dataclass(frozen=True)
class DedupPlan:
    work: str                 # OUT/_work
    n_tasks: int              # filter tasks, ids 0..n_tasks-1 in input order
    parts: int                # key partitions = node partitions
    masks: tuple              # LSH tables (the same as the single path's for this many samples)
    variants: int             # pHash variants per sample
    k: int
    region_masks: tuple       # LSH tables on the centre region (empty: the region rule is off)
    region_k: int
    region_min_agree: int
    semantic_threshold: float  # 0: no semantic deduplication
    semantic_probes: int
    exact: bool
    near: bool
    captions: bool
    caption_jaccard: float

    @property
    def layout(self) -> WorkLayout:
        return WorkLayout(self.work)

    def task_part(self, task):
        """The node partition of a filter task's samples (a task's range lies in one partition)."""
        return task * self.parts // self.n_tasks

    def node_part(self, ids: np.ndarray) -> np.ndarray:
        return self.task_part(WorkLayout.task_of(ids))

    def meta_file(self, task: int) -> Path:
        return self.layout.meta_file(task)


EXACT = np.dtype([("key", "S20"), ("id", "<i8")])
EDGE = np.dtype([("src", "<i8"), ("dst", "<i8")])


def _near_dtype(variants: int) -> np.dtype:
    return np.dtype([("bucket", "<u8"), ("id", "<i8"), ("hashes", "<u8", (variants,))])


REGION = np.dtype([("bucket", "<u8"), ("id", "<i8"), ("regions", "<u8", (9,))])
def _semantic_dtype(dim: int) -> np.dtype:
    return np.dtype([("cluster", "<i8"), ("id", "<i8"), ("emb", "<f2", (dim,))])


SIMILARITY = np.dtype([("id", "<i8"), ("sim", "<f4")])
MINHASH = np.dtype([("band", "u1"), ("key", f"S{4 * 64 // MINHASH_BANDS}"), ("id", "<i8"), ("sig", "<u4", (64,))])


def _bytes_part(keys: np.ndarray, parts: int) -> np.ndarray:
    raw = np.frombuffer(keys.tobytes(), np.uint8).reshape(len(keys), keys.dtype.itemsize)
    words = np.ascontiguousarray(raw[:, :keys.dtype.itemsize // 8 * 8]).view("<u8")
    h = np.zeros(len(keys), np.uint64)
    for column in words.T:
        h = mix64(h ^ column)
    return (h % np.uint64(parts)).astype(np.int64)


def write_partitioned(directory: Path, name: str, records: np.ndarray, part: np.ndarray, parts: int) -> int:
    """``records`` sorted by partition into ``name.npy``, with ``name.offsets.npy`` ([parts + 1])."""
    order = np.argsort(part, kind="stable")
    np.save(directory / f"{name}.npy", records[order])
    np.save(directory / f"{name}.offsets.npy", np.searchsorted(part[order], np.arange(parts + 1)))
    return records.nbytes


def read_partition(directories, name: str, p: int, dtype: np.dtype) -> np.ndarray:
    """Partition ``p`` of ``name`` from every directory that has it (memory-mapped, sliced)."""
    chunks = [np.zeros(0, dtype)]
    for d in directories:
        f = Path(d) / f"{name}.npy"
        if f.is_file():
            offsets = np.load(Path(d) / f"{name}.offsets.npy")
            chunks.append(np.array(np.load(f, mmap_mode="r")[offsets[p]:offsets[p + 1]]))
    return np.concatenate(chunks)


def _write_edges(directory: Path, name: str, a: np.ndarray, b: np.ndarray, plan: DedupPlan) -> int:
    """Undirected edges, stored in both directions, each at its source node's partition."""
    edges = np.empty(2 * a.size, EDGE)
    edges["src"], edges["dst"] = np.r_[a, b], np.r_[b, a]
    return write_partitioned(directory, name, edges, plan.node_part(edges["src"]), plan.parts)


def _task_dir(final: Path):
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path, info: dict) -> dict:
    (tmp / "done.json").write_text(json.dumps(info))
    commit_dir(tmp, final)
    return info


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ``ru_maxrss`` carries over what the parent held
    when a spawned worker was forked, before its exec; ``VmHWM`` is the worker's own."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit_task(task: int, plan: DedupPlan) -> dict:
    """Pass 1: one filter task's keys, by key partition."""
    final = plan.layout.emit_dir(task)
    if final.is_dir():
        return json.loads((final / "done.json").read_text())
    columns = (["uid", "pixel_sha1", "phash"] + (["regions"] if plan.region_masks else [])
               + (["caption_sha1", "minhash"] if plan.captions else []))
    meta = read_meta(plan.meta_file(task), columns)
    ids = meta["uid"].astype(np.int64)
    tmp, written = _task_dir(final), 0
    if plan.exact:
        rec = np.empty(ids.size, EXACT)
        rec["key"], rec["id"] = [bytes.fromhex(h) for h in meta["pixel_sha1"]], ids
        written += write_partitioned(tmp, "exact", rec, _bytes_part(rec["key"], plan.parts), plan.parts)
    if plan.near and ids.size:
        hashes = meta["phash"]
        n, v = hashes.shape
        # a variant equal to an earlier one of the same sample (the untrimmed pHash of a picture
        # without borders) adds no pair: its keys are left out
        new = ~np.any(np.triu(hashes[:, :, None] == hashes[:, None, :], 1), axis=1).reshape(-1)
        owner, flat = np.repeat(ids, v)[new], hashes.reshape(-1)[new]
        m = flat.size
        rec = np.empty(m * len(plan.masks), _near_dtype(v))
        for t in range(len(plan.masks)):
            chunk = rec[t * m:(t + 1) * m]
            chunk["bucket"] = lsh_bucket(flat, list(plan.masks), t)
            chunk["id"], chunk["hashes"] = owner, hashes[np.repeat(np.arange(n), v)[new]]
        part = (mix64(rec["bucket"]) % np.uint64(plan.parts)).astype(np.int64)
        written += write_partitioned(tmp, "near", rec, part, plan.parts)
    if plan.region_masks and ids.size:
        regions, n = meta["regions"], ids.size
        rec = np.empty(n * len(plan.region_masks), REGION)
        for t in range(len(plan.region_masks)):
            chunk = rec[t * n:(t + 1) * n]
            chunk["bucket"] = lsh_bucket(regions[:, CENTRE_REGION], list(plan.region_masks), t)
            chunk["id"], chunk["regions"] = ids, regions
        part = (mix64(rec["bucket"]) % np.uint64(plan.parts)).astype(np.int64)
        written += write_partitioned(tmp, "region", rec, part, plan.parts)
    if plan.semantic_threshold and ids.size:
        emb = np.load(plan.meta_file(task).with_name(sem.EMBEDDINGS_FILE))
        cluster, owner, vectors = sem.probe_records(ids, emb, _centroids(plan), plan.semantic_probes)
        rec = np.empty(cluster.size, _semantic_dtype(emb.shape[1]))
        rec["cluster"], rec["id"], rec["emb"] = cluster, owner, vectors
        written += write_partitioned(tmp, "semantic", rec, rec["cluster"] % plan.parts, plan.parts)
    if plan.captions:
        rec = np.empty(ids.size, EXACT)
        rec["key"], rec["id"] = [bytes.fromhex(h) for h in meta["caption_sha1"]], ids
        written += write_partitioned(tmp, "caption", rec, _bytes_part(rec["key"], plan.parts), plan.parts)
        sigs = meta["minhash"]
        rec = np.empty(ids.size * MINHASH_BANDS, MINHASH)
        rec["band"] = np.tile(np.arange(MINHASH_BANDS, dtype=np.uint8), ids.size)
        rec["key"] = minhash_band_keys(sigs).reshape(-1)
        rec["id"], rec["sig"] = np.repeat(ids, MINHASH_BANDS), np.repeat(sigs, MINHASH_BANDS, axis=0)
        band_key = np.empty(rec.size, np.dtype([("band", "u1"), ("pad", "S7"), ("key", rec.dtype["key"])]))
        band_key["band"], band_key["pad"], band_key["key"] = rec["band"], b"", rec["key"]
        written += write_partitioned(tmp, "minhash", rec, _bytes_part(band_key, plan.parts), plan.parts)
    return _commit(tmp, final, {"bytes": written, "peak_rss_mb": _peak_rss_mb()})


def bucket_task(q: int, plan: DedupPlan) -> dict:
    """Pass 2: the edges of key partition ``q``, by node partition."""
    final = plan.layout.bucket_dir(q)
    if final.is_dir():
        return json.loads((final / "done.json").read_text())
    sources = [plan.layout.emit_dir(t) for t in range(plan.n_tasks)]
    empty = np.zeros(0, np.int64)
    image, caption, semantic, written = [(empty, empty)], [(empty, empty)], [(empty, empty)], 0
    exact_dups = empty
    if plan.exact:
        rec = read_partition(sources, "exact", q, EXACT)
        image.append(star_edges([rec["key"]], rec["id"]))
        exact_dups = np.unique(image[-1][1])  # every member of an exact group but its first
    if plan.near:
        rec = read_partition(sources, "near", q, _near_dtype(plan.variants))
        image.append(verified_edges([rec["bucket"]], rec["id"], lambda idx: rec["hashes"][idx],
                                    functools.partial(within_distance, k=plan.k)))
    if plan.region_masks:
        rec = read_partition(sources, "region", q, REGION)
        image.append(verified_edges([rec["bucket"]], rec["id"], lambda idx: rec["regions"][idx],
                                    functools.partial(regions_agree, k=plan.region_k,
                                                      min_agree=plan.region_min_agree)))
    if plan.captions:
        rec = read_partition(sources, "caption", q, EXACT)
        caption.append(star_edges([rec["key"]], rec["id"]))
        rec = read_partition(sources, "minhash", q, MINHASH)
        caption.append(verified_edges([rec["band"], rec["key"]], rec["id"], lambda idx: rec["sig"][idx],
                                      functools.partial(similar_captions, threshold=plan.caption_jaccard)))
    best = np.zeros(0, SIMILARITY)
    if plan.semantic_threshold:
        rec = read_partition(sources, "semantic", q, _semantic_dtype(_centroids(plan).shape[1]))
        a, b, sims = sem.clustered_edges(rec["id"], rec["emb"], rec["cluster"], plan.semantic_threshold)
        semantic.append((a, b))
        best = np.rec.fromarrays(sem.best_similarity(a, b, sims), dtype=SIMILARITY)
    tmp = _task_dir(final)
    written += write_partitioned(tmp, "similarity", best, plan.node_part(best["id"]), plan.parts)
    for name, edges in (("image", image), ("semantic", semantic), ("caption", caption)):
        written += _write_edges(tmp, name, np.concatenate([e[0] for e in edges]),
                                np.concatenate([e[1] for e in edges]), plan)
    written += write_partitioned(tmp, "exact_dups", exact_dups, plan.node_part(exact_dups), plan.parts)
    return _commit(tmp, final, {"bytes": written, "peak_rss_mb": _peak_rss_mb()})


def _neighbours(edges: np.ndarray):
    """Unique directed edges sorted by (src, dst), and the start and length of each src's run."""
    src, dst = unique_edges_directed(edges["src"], edges["dst"])
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]]) if src.size else np.zeros(0, np.int64)
    return src, dst, starts, np.diff(np.r_[starts, src.size])


def unique_edges_directed(src: np.ndarray, dst: np.ndarray):
    keep = src != dst
    src, dst = src[keep], dst[keep]
    order = np.lexsort([dst, src])
    src, dst = src[order], dst[order]
    first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])] if src.size else np.zeros(0, bool)
    return src[first], dst[first]


def _cc_inputs(name: str, rnd: int, plan: DedupPlan) -> list[tuple[list[Path], str]]:
    if rnd > 0:
        return [(plan.layout.cc_parts(name, rnd - 1), "edges")]
    buckets = [plan.layout.bucket_dir(q) for q in range(plan.parts)]
    files = {"image": ["image"], "visual": ["image", "semantic"], "all": ["image", "semantic", "caption"]}[name]
    return [(buckets, f) for f in files]


def _read_cc_input(name: str, rnd: int, p: int, plan: DedupPlan) -> np.ndarray:
    return np.concatenate([read_partition(dirs, f, p, EDGE) for dirs, f in _cc_inputs(name, rnd, plan)])


def cc_round_task(job: tuple[str, int, int], plan: DedupPlan) -> dict:
    """Pass 3: one round of connected components on node partition ``p``: reports whether its
    nodes already form stars around their smallest node (when all do, the components are found)
    and writes the next round's edges (large-star on even rounds, small-star on odd ones)."""
    name, rnd, p = job
    final = plan.layout.cc_dir(name, rnd, p)
    if final.is_dir():
        return json.loads((final / "done.json").read_text())
    src, dst, starts, lengths = _neighbours(_read_cc_input(name, rnd, p, plan))
    first = dst[starts]  # each node's smallest neighbour
    stars = bool(np.all((first > src[starts]) | (lengths == 1)))
    node_min = np.repeat(np.minimum(src[starts], first), lengths)
    if rnd % 2 == 0:  # large-star: every larger neighbour v of u links to min(u, neighbours of u)
        larger = dst > src
        a, b = dst[larger], node_min[larger]
    else:  # small-star: u and its smaller neighbours link to the smallest of those
        smaller = dst < src
        m = np.repeat(first, lengths)[smaller]
        a, b = np.r_[src[smaller], dst[smaller]], np.r_[m, m]
    tmp = _task_dir(final)
    written = _write_edges(tmp, "edges", a, b, plan)  # a star stays a star: the next round needs it too
    return _commit(tmp, final, {"stars": stars, "edges": int(src.size), "bytes": written,
                                "peak_rss_mb": _peak_rss_mb()})


def _star_labels(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node, smallest node of its component) for every non-smallest node, from converged stars."""
    src, dst, starts, lengths = _neighbours(edges)
    leaf = dst[starts] < src[starts]
    return src[starts][leaf], dst[starts][leaf]


def label_task(p: int, plan: DedupPlan, rounds: dict) -> dict:
    """Pass 4: ``duplicate_of`` and reason of the duplicates among node partition ``p``'s nodes."""
    final = plan.layout.label_dir(p)
    if final.is_dir():
        return json.loads((final / "done.json").read_text())
    buckets = [plan.layout.bucket_dir(q) for q in range(plan.parts)]
    exact_dups = read_partition(buckets, "exact_dups", p, np.dtype("<i8"))
    near_nodes, _ = _star_labels(_read_cc_input("image", rounds["image"], p, plan))
    names = _cc_names(plan)
    visual_nodes = _star_labels(_read_cc_input("visual", rounds["visual"], p, plan))[0] if "visual" in names else near_nodes
    nodes, reps = _star_labels(_read_cc_input(names[-1], rounds[names[-1]], p, plan))
    reason = np.where(np.isin(nodes, exact_dups), Reason.EXACT, np.where(
        np.isin(nodes, near_nodes), Reason.NEAR_IMAGE,
        np.where(np.isin(nodes, visual_nodes), Reason.SEMANTIC, Reason.CAPTION))).astype(np.int8)
    best = read_partition(buckets, "similarity", p, SIMILARITY)
    ids, sims = sem.highest_per_node(best["id"], best["sim"])  # a node's edges may span key partitions
    at = np.searchsorted(ids, nodes)
    semantic = reason == Reason.SEMANTIC
    semantic[semantic] &= (at[semantic] < ids.size)
    semantic[semantic] &= ids[at[semantic]] == nodes[semantic]
    sim = np.full(nodes.size, np.nan, np.float32)
    sim[semantic] = sims[at[semantic]]
    tmp = _task_dir(final)
    np.save(tmp / "labels.npy", np.rec.fromarrays([nodes, reps, reason, sim], names="id,rep,reason,sim"))
    return _commit(tmp, final, {"duplicates": int(nodes.size), "peak_rss_mb": _peak_rss_mb()})


def partitioned_duplicates(work: Path, n_tasks: int, cfg: PrepareConfig, run, log) -> tuple[Path, dict]:
    """The partitioned path. ``run(fn, items, desc)`` maps tasks over the engine's workers.
    Returns ``work/dedup.parquet`` and per-pass measurements (seconds, bytes, peak RSS)."""
    import pyarrow.parquet as pq
    d = cfg.dedup
    layout = WorkLayout(work)
    layout.dedup.mkdir(exist_ok=True)
    n = sum(pq.ParquetFile(layout.meta_file(t)).metadata.num_rows
            for t in range(n_tasks))
    variants = _hash_variants(work, n_tasks)
    masks = hash_tables(n * variants, d.phash_max_distance)[0] if n else []
    region_masks = hash_tables(n, d.region_max_distance)[0] if n and _regions_on(cfg) else []
    plan = DedupPlan(str(work), n_tasks, max(1, math.ceil(n / d.partition_samples)), tuple(masks), variants,
                     d.phash_max_distance, tuple(region_masks), d.region_max_distance, d.region_min_agree,
                     d.semantic_threshold if d.semantic_model and n else 0.0, d.semantic_probes,
                     d.exact_images, d.near_images, d.captions, d.caption_jaccard)
    report = {"samples": n, "partitions": plan.parts, "lsh_tables": len(masks), "region_tables": len(region_masks)}
    if plan.semantic_threshold and not layout.centroids.is_file():
        t0 = time.time()
        centroids = semantic_centroids(work, n_tasks, n, d.semantic_cluster_size)
        buf = io.BytesIO()
        np.save(buf, centroids)
        atomic_write_bytes(layout.centroids, buf.getvalue())
        report["centroids"] = {"clusters": len(centroids), "seconds": round(time.time() - t0, 2)}

    def timed(pass_name, fn, items):
        t0 = time.time()
        out = run(functools.partial(fn, plan=plan), items, f"dedup {pass_name}")
        report[pass_name] = {"tasks": len(items), "seconds": round(time.time() - t0, 2),
                             "bytes_written": sum(o.get("bytes", 0) for o in out),
                             "peak_rss_mb_per_worker": round(max((o["peak_rss_mb"] for o in out), default=0), 1)}
        return out

    timed("emit", emit_task, list(range(n_tasks)))
    timed("buckets", bucket_task, list(range(plan.parts)))
    rounds = {}
    for name in _cc_names(plan):
        for rnd in range(MAX_CC_ROUNDS):
            out = timed(f"cc_{name}_round_{rnd}", cc_round_task, [(name, rnd, p) for p in range(plan.parts)])
            if all(o["stars"] for o in out):
                rounds[name] = rnd
                break
        else:
            raise RuntimeError(f"connected components did not converge in {MAX_CC_ROUNDS} rounds")
    report["cc_rounds"] = {k: v + 1 for k, v in rounds.items()}
    timed("labels", functools.partial(label_task, rounds=rounds), list(range(plan.parts)))

    uid, key, source, dup_of, reason, similarity = [], [], [], [], [], []
    labels = {}
    for t in range(n_tasks):
        meta = pq.read_table(plan.meta_file(t), columns=["uid", "key", "source"]).to_pydict()
        p = plan.task_part(t)
        if p not in labels:
            rec = np.load(layout.label_dir(p) / "labels.npy")
            labels = {p: dict(zip(rec["id"].tolist(), zip(rec["rep"].tolist(), rec["reason"].tolist(),
                                                          rec["sim"].tolist())))}
        for u in meta["uid"]:
            rep, why, sim = labels[p].get(int(u), (None, None, None))
            dup_of.append(None if rep is None else WorkLayout.format_uid(rep))
            reason.append(None if why is None else REASONS[why])
            similarity.append(sim if why == Reason.SEMANTIC and not math.isnan(sim) else None)
        uid += meta["uid"]
        key += meta["key"]
        source += meta["source"]
    write_dedup_table(layout.dedup_file, uid, key, source, dup_of, reason, similarity)
    log(f"dedup (partitioned): {plan.parts} partitions, {len(masks)} LSH tables, "
        f"{sum(r is not None for r in dup_of)} duplicates among {n} samples")
    return layout.dedup_file, report


def _cc_names(plan: DedupPlan) -> list[str]:
    """The connected-components passes: image edges; with semantic ones ("visual"); with captions ("all")."""
    return ["image"] + (["visual"] if plan.semantic_threshold else []) + (["all"] if plan.captions else [])


def _centroids(plan: DedupPlan) -> np.ndarray:
    return np.load(plan.layout.centroids)


def semantic_centroids(work: Path, n_tasks: int, n: int, cluster_size: int) -> np.ndarray:
    """k-means centroids from the fixed sample of rows (``semantic.centroid_sample_rows``), read
    task by task (memory-mapped), so that both paths fit them on the same array."""
    k = sem.n_clusters(n, cluster_size)
    rows, chunks, start = sem.centroid_sample_rows(n, k), [], 0
    for t in range(n_tasks):
        f = WorkLayout(work).filter_dir(t) / sem.EMBEDDINGS_FILE
        emb = np.load(f, mmap_mode="r")
        mine = rows[(rows >= start) & (rows < start + len(emb))] - start
        chunks.append(np.asarray(emb[mine]))
        start += len(emb)
    return sem.fit_centroids(np.concatenate(chunks), k)


def _hash_variants(work: Path, n_tasks: int) -> int:
    import pyarrow.parquet as pq
    for t in range(n_tasks):
        rows = pq.read_table(WorkLayout(work).meta_file(t), columns=["phash"]).column(0)
        if len(rows):
            return len(rows[0].as_py())
    return 1


def single_process_duplicates(work: Path, n_tasks: int, cfg: PrepareConfig) -> Path:
    columns, layout = meta_columns(cfg), WorkLayout(work)
    parts = [read_meta(layout.meta_file(t), columns) for t in range(n_tasks)]
    parts = [p for p in parts if len(p["uid"])]  # a task whose samples were all rejected has none
    meta = {c: ([x for p in parts for x in p[c]] if c in ("key", "source", "pixel_sha1", "caption_sha1")
                else np.concatenate([p[c] for p in parts])) for c in columns} if parts else {c: [] for c in columns}
    semantic_edges = None
    n = len(meta["uid"])
    if cfg.dedup.semantic_model and n:  # the partitioned path's steps, on the same arrays
        centroids = semantic_centroids(work, n_tasks, n, cfg.dedup.semantic_cluster_size)
        emb = np.concatenate([np.load(layout.filter_dir(t) / sem.EMBEDDINGS_FILE) for t in range(n_tasks)])
        cluster, ids, vectors = sem.probe_records(np.arange(n, dtype=np.int64), emb, centroids, cfg.dedup.semantic_probes)
        semantic_edges = sem.clustered_edges(ids, vectors, cluster, cfg.dedup.semantic_threshold)
    dup_of, reasons, similarity = find_duplicates(meta, cfg, semantic_edges)
    uids = [u.decode() for u in meta["uid"]]
    write_dedup_table(layout.dedup_file, uids, meta["key"], meta["source"],
                      [None if d is None else uids[d] for d in dup_of], reasons, similarity)
    return layout.dedup_file
