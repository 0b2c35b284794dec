"""Web-style near duplicates: recall per copy kind, precision, look-alikes kept, the region rule's
choice, and filter + hash throughput before and after border trimming and region hashes.

Run (from the repository root; about 10 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/web_dedup.py --json benchmarks/results/web_dedup.json

1. Data (``coca.prepare.planted.web_planted_samples``): ``--distinct`` random 224 px "photos",
   ``--copies`` copies cycling through 8 kinds (exact, resized, recompressed, cropped; border,
   overlay_text, overlay_logo, caption_bar) and ``--groups`` groups of 3 look-alikes cycling through
   scene_objects, texture_shift and pan_frames — genuinely different pictures, all to be kept —
   shuffled into tar shards of 1,000.
2. The whole job (`coca data prepare`, ``filters.min_side=100``) on the local engine with
   ``--workers`` processes and on Ray in local mode: recall per copy kind (the copy ends in its
   original's group), overall recall and precision (``planted.score``), look-alikes kept per kind,
   and whether Ray wrote the same bytes (shards, rejects.parquet).
3. The rule: from the run's own hashes (``_work/filter/*/meta.parquet``), for each copy and its
   original, each look-alike pair and 20,000 random pairs of distinct pictures, the share the
   region rule links for a grid of (regions that must agree, distance), and the share the plain
   pHash rule links (the old rule: variants of the untrimmed picture only).
4. Filter + hash throughput of one process on one shard (decode, filters, pixel SHA-1, hashes,
   MinHash), ``--reps`` alternating runs of the old hashing (``phash_variants``) and the new
   (``image_hashes``: trimming, trimmed variants, untrimmed pHash, 9 region hashes); median
   samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(tmp: Path, args) -> tuple[dict, dict]:
    from coca.prepare.planted import web_planted_samples, write_shards
    samples, truth, kinds = web_planted_samples(args.distinct, args.copies, args.groups, seed=0, size=224)
    write_shards(samples, tmp / "in", 1000)
    return truth, kinds


def whole_job(tmp: Path, engine: str, args) -> tuple[Path, float]:
    from coca.cli import main
    out = tmp / f"out_{engine}"
    shards = sorted(str(p) for p in (tmp / "in").glob("*.tar"))
    t0 = time.time()
    sets = ["filters.min_side=100", f"workers={args.workers}", f"engine={engine}"]
    assert main(["data", "prepare", "--input", *shards, "--output", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    return out, round(time.time() - t0, 1)


def scores(out: Path, truth: dict, kinds: dict) -> dict:
    import pyarrow.parquet as pq

    from coca.prepare.planted import (
        COPY_KINDS,
        LOOKALIKE_KINDS,
        WEB_COPY_KINDS,
        found_copies,
        score,
    )
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    keys = {}
    for f in sorted((out / "_work" / "filter").glob("task_*/meta.parquet")):
        t = pq.read_table(f, columns=["uid", "key"]).to_pydict()
        keys.update(zip(t["uid"], t["key"]))
    keys.update({r["uid"]: r["key"] for r in rejects})
    result = score(rejects, keys, truth)
    found = found_copies(rejects, keys, truth)
    removed = {keys[r["uid"]] for r in rejects}
    by_kind = {}
    for kind in COPY_KINDS + WEB_COPY_KINDS:
        copies = [k for k, v in kinds.items() if v == kind]
        by_kind[kind] = round(sum(k in found for k in copies) / len(copies), 4)
    kept = {}
    for kind in LOOKALIKE_KINDS:
        members = [k for k, v in kinds.items() if v == kind]
        kept[kind] = round(sum(k not in removed for k in members) / len(members), 4)
    reasons = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {**result, "recall_by_kind": by_kind, "lookalikes_kept_by_kind": kept, "rejected_by_reason": reasons}


def rule_grid(out: Path, truth: dict, kinds: dict, args) -> dict:
    """Shares of pairs each rule links, from the hashes the run computed."""
    import pyarrow.parquet as pq

    from coca.prepare.hashing import CENTRE_REGION, popcount
    from coca.prepare.planted import LOOKALIKE_KINDS
    rows = {}
    for f in sorted((out / "_work" / "filter").glob("task_*/meta.parquet")):
        t = pq.read_table(f, columns=["key", "phash", "regions"]).to_pydict()
        for key, ph, rg in zip(t["key"], t["phash"], t["regions"]):
            rows[key] = (np.array(ph, np.int64).view(np.uint64), np.array(rg, np.int64).view(np.uint64))
    pairs = {kind: [] for kind in set(kinds.values())}
    for copy, original in truth.items():
        if copy in rows and original in rows:
            pairs[kinds[copy]].append((copy, original))
    for kind in LOOKALIKE_KINDS:
        groups = {}
        for k, v in kinds.items():
            if v == kind and k in rows:
                groups.setdefault(k[:-1], []).append(k)
        pairs[kind] = [(g[i], g[j]) for g in groups.values() for i in range(len(g)) for j in range(i + 1, len(g))]
    originals = [k for k in rows if k.startswith("o")]
    rng = np.random.default_rng(0)
    pairs["distinct"] = [(originals[i], originals[j]) for i, j in rng.integers(0, len(originals), (20_000, 2)) if i != j]
    grid = [(agree, k) for agree in (4, 5, 6, 7) for k in (4, 6, 8)]
    out_rows = {}
    for kind, kind_pairs in pairs.items():
        a = np.stack([rows[x][1] for x, _ in kind_pairs])
        b = np.stack([rows[y][1] for _, y in kind_pairs])
        d = popcount(a ^ b)
        pa_, pb = np.stack([rows[x][0] for x, _ in kind_pairs]), np.stack([rows[y][0] for _, y in kind_pairs])
        plain = popcount(pa_[:, -1:] ^ pb[:, -1:]).min(1)  # untrimmed pHash against untrimmed pHash
        variants = popcount(pa_[:, :, None] ^ pb[:, None, :]).reshape(len(kind_pairs), -1).min(1)
        out_rows[kind] = {
            "pairs": len(kind_pairs),
            "untrimmed_phash_within_6": round(float(np.mean(plain <= 6)), 4),
            "variants_within_6": round(float(np.mean(variants <= 6)), 4),
            **{f"regions_{agree}_of_9_within_{k}": round(float(np.mean((d[:, CENTRE_REGION] <= k) & ((d <= k).sum(1) >= agree))), 4)
               for agree, k in grid},
        }
    return out_rows


def throughput(tmp: Path, reps: int) -> dict:
    """Filter + hash samples/s of one process on one shard: the old hashing against the new."""
    from PIL import Image

    from coca.prepare import filters, hashing
    from coca.prepare.config import load_prepare_config
    from coca.prepare.pipeline import list_tasks, read_task
    cfg = load_prepare_config(None, ["filters.min_side=100"])
    task = list_tasks([str(tmp / "in" / "00000.tar")], cfg)[0]
    items = [x for x in read_task(task, cfg) if not hasattr(x, "reason")]

    def old_phash64(image):  # the hashing before border trimming and region hashes, as it was
        grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
        low = (hashing._DCT @ grey @ hashing._DCT.T)[:8, :8].ravel()
        return int(np.packbits(low > np.median(low)).view(">u8")[0])

    def old_hashes(image, min_content):
        side = min(image.size)
        variants = [old_phash64(image.crop((f * side, f * side, image.width - f * side, image.height - f * side))
                                if f else image) for f in hashing.CROP_VARIANTS]
        return {"phash": variants, "regions": [], "content_box": []}

    def run(hash_fn) -> float:
        filters.image_hashes = hash_fn
        t0 = time.perf_counter()
        for key, _, data, caption in items:
            filters.process_sample(data, caption, cfg.filters, key)
        return len(items) / (time.perf_counter() - t0)

    new_hashes = hashing.image_hashes
    times = {"before": [], "after": []}
    for r in range(reps):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            times[name].append(run(old_hashes if name == "before" else new_hashes))
    filters.image_hashes = new_hashes
    return {"samples": len(items), "reps": reps, "runs": {k: [round(x, 1) for x in v] for k, v in times.items()},
            "before_samples_per_s": round(statistics.median(times["before"]), 1),
            "after_samples_per_s": round(statistics.median(times["after"]), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--distinct", type=int, default=6000)
    p.add_argument("--copies", type=int, default=3200)
    p.add_argument("--groups", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        truth, kinds = build(tmp, args)
        n = sum(1 for _ in (tmp / "in").glob("*.tar"))
        result = {"benchmark": "web_dedup", "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "loadavg_start": os.getloadavg(), "shards": n}
        result["throughput_one_process"] = throughput(tmp, args.reps)
        local, seconds = whole_job(tmp, "local", args)
        result["samples"] = json.loads((local / "stats.json").read_text())["input_samples"]
        result.update(whole_job_seconds_local=seconds, **scores(local, truth, kinds))
        result["rule_grid"] = rule_grid(local, truth, kinds, args)
        if not args.no_ray:
            ray, seconds = whole_job(tmp, "ray", args)
            names = ["rejects.parquet", *sorted(p.name for p in local.glob("*.tar"))]
            result["whole_job_seconds_ray"] = seconds
            result["ray_identical_to_local"] = all((ray / f).read_bytes() == (local / f).read_bytes() for f in names)
        result["loadavg_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "rule_grid"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
