"""Semantic deduplication: the same picture re-shot, re-rendered or lightly edited, found with a
coca model's own image embeddings (``dedup.semantic_model``), as SemDeDup does.

- Stage 1 (``filter_task``): every accepted image's embedding, L2-normalised, batched on the GPU
  when there is one, saved as float16 beside the task's ``meta.parquet`` (``embeddings.npy``).
- Stage 2: clustering, then comparison within clusters — never all pairs. Spherical k-means
  (``fit_centroids``) on a fixed sample of at most ``CENTROID_SAMPLE_PER_CLUSTER`` embeddings per
  cluster, one cluster per ``dedup.semantic_cluster_size`` samples; every embedding goes to its
  nearest centroid; within a cluster, every pair with cosine >= ``dedup.semantic_threshold`` is an
  edge (``cluster_edges``, in blocks). Why clustering rather than an approximate nearest-neighbour
  index: the clusters are the partitions — on Ray each is processed by one task, independently,
  with memory bounded by its size — and it needs nothing beyond numpy. The price: a pair whose
  members share none of their nearest clusters is missed. With one cluster per embedding a third
  of planted copies were missed on unstructured random vectors, where cluster boundaries cut
  anywhere; comparing each embedding within its 2 nearest clusters costs twice the comparisons
  and recovers most of them (measured in BENCHMARKS.md).

Both the single-process and the partitioned path call these functions on the same arrays in the
same order, so they give the same edges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import UserError

EMBEDDINGS_FILE = "embeddings.npy"
MODEL_FILE = "semantic_model.json"  # in OUT/_work: which model the embeddings were made with
CENTROID_SAMPLE_PER_CLUSTER = 64
KMEANS_ITERATIONS = 10
BLOCK = 2048  # rows per block of the within-cluster similarity matrix

_models: dict = {}


def load_semantic_model(path: str):
    """The model (cached per process), on the GPU when there is one, in eval mode; a clear error
    for a directory that is not a loadable coca model."""
    key = (path, *(f.stat().st_mtime_ns for f in sorted(Path(path).glob("*")) if f.is_file()))
    if key not in _models:  # a directory rewritten in place is loaded again
        import torch

        from ..models.coca import load
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = load(path, device=device)
        except UserError:
            raise
        except Exception as e:  # a checkpoint whose shapes do not fit its config, a broken file
            raise UserError(f"dedup.semantic_model {path}: cannot load it as a coca model ({type(e).__name__}: {e})")
        _models[key] = model.eval()
    return _models[key]


def model_info(path: str) -> dict:
    model = load_semantic_model(path)
    return {"model": str(Path(path).resolve()), "embed_dim": int(model.cfg.embed_dim),
            "image_size": int(model.cfg.vision.image_size)}


def check_model(work: Path, path: str) -> dict:
    """Load the model once before any work starts and pin it to the work directory: embeddings
    from another model (another embedding size, or another model altogether) must not be mixed."""
    info = model_info(path)
    pinned = work / MODEL_FILE
    if pinned.is_file():
        before = json.loads(pinned.read_text())
        if before != info:
            raise UserError(f"{work} holds embeddings made with {before['model']} (embedding size {before['embed_dim']}, "
                            f"{before['image_size']} px); dedup.semantic_model is {info['model']} (embedding size "
                            f"{info['embed_dim']}, {info['image_size']} px): use the same model, or remove {work}")
    else:
        pinned.write_text(json.dumps(info))
    return info


def embed_images(images: list, path: str, batch_size: int = 64) -> np.ndarray:
    """[n, D] float16 L2-normalised image embeddings of PIL images."""
    import torch

    from ..cpu import one_cpu_thread
    from ..data.transforms import eval_transform
    model = load_semantic_model(path)
    transform = eval_transform(model.cfg.vision.image_size)
    p = next(model.parameters())
    out = [np.zeros((0, model.cfg.embed_dim), np.float16)]
    with torch.no_grad(), one_cpu_thread(p.device):  # the same float16 bits on every engine
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(p.device, p.dtype)
            emb = torch.nn.functional.normalize(model.encode_image(batch).float(), dim=-1)
            out.append(emb.cpu().numpy().astype(np.float16))
    return np.concatenate(out)


def n_clusters(n: int, cluster_size: int) -> int:
    return max(1, math.ceil(n / cluster_size))


def centroid_sample_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Sorted global row numbers of the k-means sample (the same in every path)."""
    size = min(n, k * CENTROID_SAMPLE_PER_CLUSTER)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def fit_centroids(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means: [k, D] unit centroids of unit vectors, initialised with k distinct sample
    rows, ``KMEANS_ITERATIONS`` rounds of assignment by cosine and renormalised means (an empty
    cluster keeps its centroid)."""
    x = sample.astype(np.float32)
    k = min(k, len(x))
    centroids = x[np.sort(np.random.default_rng(seed + 1).choice(len(x), k, replace=False))].copy()
    for _ in range(KMEANS_ITERATIONS):
        nearest = assign(x, centroids)
        counts = np.bincount(nearest, minlength=k)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        sums = np.zeros_like(centroids)
        sums[counts > 0] = np.add.reduceat(x[np.argsort(nearest, kind="stable")], starts[counts > 0])
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids)
    return centroids


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (highest cosine) of each row, computed block by block."""
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), BLOCK):
        out[start:start + BLOCK] = (x[start:start + BLOCK].astype(np.float32) @ centroids.T).argmax(1)
    return out


def nearest_clusters(x: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """[n, probes] the ``probes`` nearest centroids of each row, nearest first. A near-duplicate
    pair whose members fall on either side of a cluster boundary still shares a cluster when each
    is compared within more than its nearest one."""
    if probes == 1:
        return assign(x, centroids)[:, None]
    probes = min(probes, len(centroids))
    out = np.empty((len(x), probes), np.int64)
    for start in range(0, len(x), BLOCK):
        sims = x[start:start + BLOCK].astype(np.float32) @ centroids.T
        top = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        out[start:start + BLOCK] = np.take_along_axis(top, order, 1)
    return out


def probe_records(ids: np.ndarray, emb: np.ndarray, centroids: np.ndarray, probes: int):
    """(cluster, id, embedding) once for each of a row's ``probes`` nearest clusters."""
    nearest = nearest_clusters(emb, centroids, probes)
    k = nearest.shape[1]
    return nearest.T.reshape(-1), np.tile(ids, k), np.tile(emb, (k, 1))


def cluster_edges(ids: np.ndarray, emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (a < b by position, as ids) between members of one cluster with cosine >= threshold,
    and their cosines. ``ids`` sorted ascending, ``emb`` [m, D] in the same order."""
    x = emb.astype(np.float32)
    out_a, out_b, out_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, len(x), BLOCK):
        sims = x[start:start + BLOCK] @ x[start:].T  # rows against themselves and every later row
        i, j = np.nonzero(sims >= threshold)
        i_global, j_global = i + start, j + start
        keep = j_global > i_global
        out_a.append(ids[i_global[keep]])
        out_b.append(ids[j_global[keep]])
        out_s.append(sims[i[keep], j[keep]])
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)


def clustered_edges(ids: np.ndarray, emb: np.ndarray, cluster: np.ndarray, threshold: float):
    """``cluster_edges`` of every cluster among these rows (each cluster's members in id order)."""
    order = np.lexsort([ids, cluster])
    ids, emb, cluster = ids[order], emb[order], cluster[order]
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]]) if len(ids) else np.zeros(0, np.int64)
    parts = [cluster_edges(ids[s:e], emb[s:e], threshold) for s, e in zip(starts, np.r_[starts[1:], len(ids)])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def best_similarity(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node, its highest cosine over its edges) for every node of the edges, nodes ascending."""
    return highest_per_node(np.r_[a, b], np.r_[s, s])


def highest_per_node(nodes: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node, its highest similarity) for every distinct node, nodes ascending."""
    order = np.lexsort([-sims, nodes])
    nodes, sims = nodes[order], sims[order]
    first = np.r_[True, nodes[1:] != nodes[:-1]] if nodes.size else np.zeros(0, bool)
    return nodes[first], sims[first]
