"""`coca data prepare`: duplicate and evaluation-overlap recall / precision, throughput, the Ray
engine against the local one, and the partitioned deduplication stage at 1M and 4M samples.

Run (from the repository root; about 7 minutes on 2 CPU cores at 1M; 4M needs about 60 GB of
free disk):

    .venv/bin/python benchmarks/prepare.py --stage2-sizes 1000000 --json benchmarks/results/prepare.json

1. Data (``coca.prepare.planted``): ``--distinct`` random 224 px "photos" with distinct captions
   plus ``--copies`` planted copies of randomly chosen ones (a quarter each: byte-exact, resized to
   50-90%, recompressed at JPEG quality 30-60, cropped by 2-5 px per side; captions re-cased or
   punctuated), and ``--eval-copies`` copies (the same four kinds) of ``--eval-images``
   evaluation pictures kept in a folder of their own; shuffled into tar shards of 1,000.
2. Filter + hash throughput per core: the filter stage alone on one shard, one process, without
   and with the evaluation set (``dedup.against``).
3. The whole job (filter + decontaminate, dedup, shuffle, shard) with ``--workers`` processes on
   each ``--engine``, default settings except ``filters.min_side=100`` (resized copies are
   112-201 px; the default 200 would filter them out first) and ``dedup.against``. Duplicate recall
   = planted copies removed as duplicates of their own group / planted copies; precision = those /
   everything removed as a duplicate; the same for ``eval_overlap`` against the planted evaluation
   copies. ``ray_identical_to_local``: the shards and rejects.parquet are the same bytes.
4. Stage 2 alone, partitioned, on ``--stage2-sizes`` synthetic hash records
   (``planted.synthetic_hash_records``: random 64-bit pHashes — 4 variants, the fourth equal to the
   first for 9 in 10 samples — and 9 region hashes; 1 exact copy, 2 near copies, 1 chain link and
   1 overlay copy per 20 samples) in tasks of 10,000, ``dedup.partition_samples`` (100,000) per
   partition, so partitions grow with the data: time, bytes written between passes (the shuffle)
   and peak RSS per worker process of each pass; and the single-process path at
   ``--single-sizes`` (its peak RSS, in a subprocess) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def build(tmp: Path, args) -> tuple[dict, dict]:
    from coca.prepare.planted import planted_eval_copies, planted_samples, write_shards
    samples, truth = planted_samples(args.distinct, args.copies, seed=0, size=224)
    evals, copies, eval_truth = planted_eval_copies(args.eval_images, args.eval_copies, seed=0, size=224)
    (tmp / "eval").mkdir(parents=True)
    for name, data in evals:
        (tmp / "eval" / name).write_bytes(data)
    import numpy as np
    everything = samples + copies
    order = np.random.default_rng(1).permutation(len(everything))
    write_shards([everything[i] for i in order], tmp / "in", 1000)
    return truth, {k: str(tmp / "eval" / v) for k, v in eval_truth.items()}


def whole_job(tmp: Path, engine: str, args, truth: dict, eval_truth: dict) -> dict:
    import pyarrow.parquet as pq

    from coca.prepare.config import load_prepare_config
    from coca.prepare.pipeline import run_prepare
    from coca.prepare.planted import COPY_KINDS, score
    cfg = load_prepare_config(None, [f"workers={args.workers}", "filters.min_side=100", f"engine={engine}",
                                     f"dedup.against={tmp / 'eval'}"])
    out = tmp / f"out_{engine}"
    t0 = time.time()
    stats = run_prepare([str(tmp / "in")], str(out), cfg, log=lambda *a: None)
    seconds = time.time() - t0
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    uid_to_key = {r["uid"]: r["key"] for r in rejects}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    info = json.loads(tf.extractfile(m).read())
                    uid_to_key[info["key"]] = info["source_key"]
    result = score([r for r in rejects if r["reason"] != "eval_overlap"], uid_to_key, truth)
    removed = {uid_to_key[r["uid"]] for r in rejects if r["reason"].startswith("duplicate_")}
    by_kind = {}
    for j, kind in enumerate(COPY_KINDS):
        keys = [f"c{i:07d}" for i in range(j, args.copies, len(COPY_KINDS))]
        # a copy counts as found if it, or its original, was removed (one of each group stays)
        by_kind[kind] = sum(k in removed or truth[k] in removed for k in keys) / len(keys)
    flagged = {r["key"]: r["eval_file"] for r in rejects if r["reason"] == "eval_overlap"}
    correct = sum(eval_truth.get(k) == f for k, f in flagged.items())
    eval_by_kind = {kind: sum(f"e{i:07d}" in flagged for i in range(j, args.eval_copies, len(COPY_KINDS)))
                    / len(range(j, args.eval_copies, len(COPY_KINDS))) for j, kind in enumerate(COPY_KINDS)}
    return {"engine": engine, **result, "found_by_copy_kind": by_kind,
            "eval_overlap_recall": round(correct / max(1, len(eval_truth)), 4),
            "eval_overlap_precision": round(correct / max(1, len(flagged)), 4),
            "eval_overlap_found_by_copy_kind": eval_by_kind, "eval_overlap_flagged": len(flagged),
            "whole_job_seconds": round(seconds, 1), "whole_job_samples_per_s": round(stats["input_samples"] / seconds, 1),
            "stats": stats, "_out": str(out)}


def filter_throughput(tmp: Path, against: bool) -> float:
    from coca.prepare.config import load_prepare_config
    from coca.prepare.decontaminate import build_eval_index
    from coca.prepare.pipeline import filter_task, list_tasks
    extra = [f"dedup.against={tmp / 'eval'}"] if against else []
    cfg = load_prepare_config(None, ["workers=1", "filters.min_side=100", *extra])
    work = tmp / f"single_{against}"
    work.mkdir()
    if against:
        build_eval_index(cfg.dedup.against, work, cfg.filters.max_pixels,
                         lambda fn, items, desc: [fn(x) for x in items], lambda *a: None)
    task = list_tasks([str(tmp / "in" / "00000.tar")], cfg)[0]
    t0 = time.time()
    counts = filter_task(task, cfg, str(work))
    return round(counts["input"] / (time.time() - t0), 1)


def stage2(n: int, workers: int) -> dict:
    """The partitioned stage 2 on n synthetic samples, with ``workers`` local processes."""
    from coca.prepare.config import load_prepare_config
    from coca.prepare.dedup import partitioned_duplicates
    from coca.prepare.engine import parallel_map
    from coca.prepare.planted import synthetic_hash_records
    work = Path(tempfile.mkdtemp(prefix="stage2_"))
    try:
        tasks = max(1, n // 10_000)
        synthetic_hash_records(work, n, tasks, seed=0)
        cfg = load_prepare_config(None, [f"workers={workers}"])
        t0 = time.time()
        _, report = partitioned_duplicates(work, tasks, cfg, lambda fn, items, desc: parallel_map(
            fn, items, "local", workers, "", desc), lambda *a: None)
        seconds = time.time() - t0
        passes = {k: v for k, v in report.items() if isinstance(v, dict) and "seconds" in v}
        return {"samples": n, "tasks": tasks, "partitions": report["partitions"], "lsh_tables": report["lsh_tables"],
                "region_tables": report["region_tables"],
                "cc_rounds": report["cc_rounds"], "seconds": round(seconds, 1), "workers": workers,
                "samples_per_s_per_core": round(n / seconds / workers, 1),
                "shuffle_bytes": sum(v["bytes_written"] for v in passes.values()),
                "emit_bytes_per_sample": round(passes["emit"]["bytes_written"] / n, 1),
                "peak_rss_mb_per_worker": max(v["peak_rss_mb_per_worker"] for v in passes.values()),
                "passes": passes}
    finally:
        shutil.rmtree(work, ignore_errors=True)


SINGLE = """
import json, resource, sys, tempfile, time, shutil
from pathlib import Path
from coca.prepare.config import load_prepare_config
from coca.prepare.dedup import single_process_duplicates
from coca.prepare.planted import synthetic_hash_records
n = int(sys.argv[1]); work = Path(tempfile.mkdtemp(prefix="single_"))
tasks = max(1, n // 10_000)
synthetic_hash_records(work, n, tasks, seed=0)
t0 = time.time()
single_process_duplicates(work, tasks, load_prepare_config(None, []))
print(json.dumps({"samples": n, "seconds": round(time.time() - t0, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
shutil.rmtree(work)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distinct", type=int, default=8000)
    p.add_argument("--copies", type=int, default=2500)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--eval-copies", type=int, default=1500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", choices=["local", "ray", "both"], default="both")
    p.add_argument("--stage2-sizes", default="1000000,4000000", help="comma-separated; empty to skip")
    p.add_argument("--single-sizes", default="1000000", help="comma-separated; empty to skip")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp())
    out: dict = {}
    try:
        t0 = time.time()
        truth, eval_truth = build(tmp, args)
        n = args.distinct + args.copies + args.eval_copies
        print(f"built {n} samples ({args.copies} duplicates, {args.eval_copies} copies of "
              f"{args.eval_images} evaluation images) in {time.time() - t0:.0f}s", flush=True)
        out["samples"] = n
        out["filter_hash_samples_per_s_one_process"] = filter_throughput(tmp, against=False)
        out["filter_hash_decontaminate_samples_per_s_one_process"] = filter_throughput(tmp, against=True)
        engines = ["local", "ray"] if args.engine == "both" else [args.engine]
        runs = {e: whole_job(tmp, e, args, truth, eval_truth) for e in engines}
        first = runs[engines[0]]
        out.update({k: v for k, v in first.items() if k not in ("engine", "stats", "_out")})
        out["workers"] = args.workers
        out["stats"] = first["stats"]
        for e, r in runs.items():
            out[f"whole_job_seconds_{e}"] = r["whole_job_seconds"]
        if len(runs) == 2:
            a, b = Path(runs["local"]["_out"]), Path(runs["ray"]["_out"])
            names = ["rejects.parquet", *(s.name for s in a.glob("*.tar"))]
            out["ray_identical_to_local"] = all((a / f).read_bytes() == (b / f).read_bytes() for f in names)
        print(json.dumps({k: v for k, v in out.items() if k != "stats"}, indent=1), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out["stage2_partitioned"] = []
    for size in [int(s) for s in args.stage2_sizes.split(",") if s]:
        r = stage2(size, args.workers)
        print(json.dumps({k: v for k, v in r.items() if k != "passes"}), flush=True)
        out["stage2_partitioned"].append(r)
    out["stage2_single_process"] = []
    for size in [int(s) for s in args.single_sizes.split(",") if s]:
        proc = subprocess.run([sys.executable, "-c", SINGLE, str(size)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
        r = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
        print(json.dumps(r), flush=True)
        out["stage2_single_process"].append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
