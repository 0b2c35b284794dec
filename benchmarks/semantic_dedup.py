"""Semantic deduplication: recall and precision against the threshold on a trained model, and the
partitioned stage at 1M embeddings.

Run (from the repository root, after `make demo` or `coca demo --out runs/demo`; ~10 minutes):

    .venv/bin/python benchmarks/semantic_dedup.py --model runs/demo/model --json benchmarks/results/semantic_dedup.json

1. Threshold tables. Held-out synthetic scenes (test split, seed 7): ``--originals`` scenes, each
   of a different object set (one or two objects), and a copy of each of the first ``--copies``
   drawn again from the same objects (other background shade and noise, objects moved: what the
   pHashes miss); and the 36 single objects, each once and in 5 copies drawn again. Embeddings with ``coca.prepare.semantic.embed_images``; the pairs each threshold
   links: within k-means clusters of ``--cluster-size``, each picture in its 2 nearest (what `coca
   data prepare` does) and over all pairs (to show what clustering loses). Recall: copies in their
   original's group (the connected component); precision: of the pictures removed (all but the
   smallest of each group), those showing the same objects as the one kept. Also the share of
   copies the pHash rule finds (borders trimmed as in stage 1).
2. 1M embeddings: ``--n`` random unit vectors of ``--dim`` (coca-large-v2's 768), one in 10 a copy
   of another with noise (cosine ~0.97), as filter-task output in tasks of 10,000; the partitioned
   stage 2 with semantic deduplication only (``partitioned_duplicates``, ``--workers`` local
   processes, clusters of 1,000), each embedding compared within its nearest cluster and within
   its 2 nearest (the default): wall time per pass, bytes written, peak RSS per worker, and recall
   of the planted copies at threshold 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest member of each node's connected component."""
    from coca.prepare.hashing import UnionFind
    uf = UnionFind(n)
    for i, j in zip(a.tolist(), b.tolist()):
        uf.union(i, j, "")
    return np.array([uf.find(i) for i in range(n)])


def scene_images(originals: int, copies: int, max_objects: int) -> tuple[list, list, int]:
    """Pictures of ``originals`` different object sets and ``copies`` copies (copy j drawn again from
    object set j mod originals), and each picture's object set. One or two objects: the first
    object sets of the held-out stream; one object: the 36 objects, each drawn with its own seed."""
    from coca.data.synthetic import SyntheticScenes, all_objects, render
    if max_objects == 1:
        objects = [(o,) for o in all_objects()][:originals]
        images = [render(o, 64, np.random.default_rng(200_000 + i)) for i, o in enumerate(objects)]
    else:
        ds = SyntheticScenes(20 * originals, split="test", seed=7, image_size=64)
        scenes = {}
        for i in range(len(ds)):
            scenes.setdefault(ds.scene(i), i)
            if len(scenes) == originals:
                break
        objects = list(scenes)
        images = [ds.load(scenes[o])[0] for o in objects]
    images += [render(objects[j % len(objects)], 64, np.random.default_rng(100_000 + j)) for j in range(copies)]
    return images, list(range(len(objects))) + [j % len(objects) for j in range(copies)], len(objects)


def threshold_table(args, originals: int, copies: int, max_objects: int) -> dict:
    from coca.prepare import semantic as sem
    from coca.prepare.hashing import image_hashes, variant_distance
    images, label, n_originals = scene_images(originals, copies, max_objects)
    n = len(images)
    t0 = time.time()
    emb = sem.embed_images(images, args.model)
    embed_s = time.time() - t0
    k = sem.n_clusters(n, args.cluster_size)
    centroids = sem.fit_centroids(emb[sem.centroid_sample_rows(n, k)], k)
    ids = np.arange(n, dtype=np.int64)
    probed = sem.probe_records(ids, emb, centroids, 2)
    phash = [image_hashes(im, 0.0)["phash"] for im in images]  # as stage 1 hashes them: borders trimmed
    hash_found = np.mean([variant_distance(phash[n_originals + j], phash[label[n_originals + j]]) <= 6
                          for j in range(copies)])
    rows = []
    for threshold in args.thresholds:
        row = {"threshold": threshold}
        for name, (cl, member, vectors) in (("clustered", probed), ("all_pairs", (np.zeros(n, np.int64), ids, emb))):
            a, b, _ = sem.clustered_edges(member, vectors, cl, threshold)
            rep = components(n, a, b)
            recall = np.mean([rep[n_originals + j] == rep[label[n_originals + j]] for j in range(copies)])
            removed = [i for i in range(n) if rep[i] != i]
            correct = sum(label[i] == label[rep[i]] for i in removed)  # the same objects as the one kept
            row[name] = {"recall": round(float(recall), 4), "removed": len(removed),
                         "precision": round(correct / max(1, len(removed)), 4)}
        rows.append(row)
    return {"pictures": n, "originals": n_originals, "copies": copies, "clusters": int(k),
            "embed_images_per_s": round(n / embed_s, 1), "phash_recall": round(float(hash_found), 4), "rows": rows}


def million(args) -> dict:
    import pyarrow.parquet as pq

    from coca.prepare import semantic as sem
    from coca.prepare.config import load_prepare_config
    from coca.prepare.dedup import partitioned_duplicates
    from coca.prepare.engine import parallel_map
    from coca.prepare.layout import WorkLayout
    from coca.prepare.planted import synthetic_hash_records
    work = Path(tempfile.mkdtemp(prefix="semantic_", dir=os.environ.get("TMPDIR")))
    try:
        tasks = max(1, args.n // 10_000)
        synthetic_hash_records(work, args.n, tasks, seed=0)
        rng = np.random.default_rng(0)
        bounds = np.linspace(0, args.n, tasks + 1).astype(int)
        everything = rng.standard_normal((args.n, args.dim), dtype=np.float32)
        everything /= np.linalg.norm(everything, axis=1, keepdims=True)
        copies = np.flatnonzero(rng.random(args.n) < 0.1)
        copies = copies[copies > 0]
        source_of = dict(zip(copies.tolist(), rng.integers(0, copies).tolist()))  # each from an earlier sample
        for c, src in source_of.items():  # in increasing order: a source that is itself a copy is final
            x = everything[src] + 0.25 * rng.standard_normal(args.dim, dtype=np.float32) / np.sqrt(args.dim)
            everything[c] = x / np.linalg.norm(x)  # cosine about 0.97 to its source
        for t in range(tasks):
            np.save(WorkLayout(work).filter_dir(t) / sem.EMBEDDINGS_FILE,
                    everything[bounds[t]:bounds[t + 1]].astype(np.float16))
        del everything
        cfg = load_prepare_config(None, [f"workers={args.workers}", "dedup.exact_images=false", "dedup.near_images=false",
                                         "dedup.semantic_model=synthetic", "dedup.semantic_threshold=0.95",
                                         f"dedup.semantic_probes={args.probes}"])
        t0 = time.time()
        out, report = partitioned_duplicates(work, tasks, cfg, lambda fn, items, desc: parallel_map(
            fn, items, "local", args.workers, "", desc), lambda *a: None)
        seconds = time.time() - t0
        table = pq.read_table(out, columns=["uid", "duplicate_of"]).to_pydict()
        index = {u: i for i, u in enumerate(table["uid"])}
        root = [i if d is None else index[d] for i, d in enumerate(table["duplicate_of"])]
        found = np.mean([root[c] == root[src] for c, src in source_of.items()])
        passes = {k: v for k, v in report.items() if isinstance(v, dict) and "tasks" in v}
        return {"samples": args.n, "dim": args.dim, "probes": args.probes, "tasks": tasks, "workers": args.workers,
                "clusters": report["centroids"]["clusters"], "partitions": report["partitions"],
                "seconds": round(seconds, 1), "embeddings_per_s": round(args.n / seconds, 1),
                "planted_copies": len(source_of), "recall_at_0.95": round(float(found), 4),
                "removed": sum(d is not None for d in table["duplicate_of"]),
                "peak_rss_mb_per_worker": max(v["peak_rss_mb_per_worker"] for v in passes.values()),
                "centroids": report["centroids"], "passes": passes}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--originals", type=int, default=600)
    p.add_argument("--copies", type=int, default=300)
    p.add_argument("--cluster-size", type=int, default=100)
    p.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")], default=[0.85, 0.9, 0.93, 0.95, 0.97, 0.99])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--million-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probes", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args()
    if args.million_only:  # in a fresh process without PyTorch, so workers' peak RSS is their own
        Path(args.json).write_text(json.dumps(million(args)))
        return
    import torch
    torch.set_num_threads(2)
    result = {"benchmark": "semantic_dedup", "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "threshold_table": threshold_table(args, args.originals, args.copies, 2),
              "threshold_table_one_object": threshold_table(args, 36, 5 * 36, 1)}
    print(json.dumps(result, indent=1))
    for probes in (1, 2) if args.n else ():
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--million-only", "--model", args.model, "--n", str(args.n),
                            "--dim", str(args.dim), "--workers", str(args.workers), "--probes", str(probes),
                            "--json", f.name], check=True)
            result["million" if probes == 2 else "million_one_probe"] = json.loads(Path(f.name).read_text())
        print(json.dumps(result["million"] if probes == 2 else result["million_one_probe"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
