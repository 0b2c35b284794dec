"""`coca data prepare` on a planted-duplicates set: duplicate recall / precision and throughput.

Run (from the repository root; about 3 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/prepare.py --json benchmarks/results/prepare.json

Builds ``--distinct`` random 224 px "photos" with distinct captions plus ``--copies`` planted
copies of randomly chosen ones (a quarter each: byte-exact, resized to 50-90%, recompressed at
JPEG quality 30-60, cropped by 2-5 px per side; captions upper-cased, capitalised with a period,
or with "!!" appended), shuffled into img2dataset-layout tar shards of 1,000 samples
(``coca.prepare.planted``). Then:

1. filter + hash throughput per core: the filter stage alone on one shard, one process;
2. the whole job (filter, dedup, shuffle, shard) with ``--workers`` processes, default settings
   except ``filters.min_side=100`` (resized copies are 112-201 px; the default 200 would filter
   them out before deduplication);
3. recall = planted copies removed as duplicates of their own group / planted copies;
   precision = those / everything removed as a duplicate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distinct", type=int, default=8000)
    p.add_argument("--copies", type=int, default=2500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import pyarrow.parquet as pq

    from coca.prepare.config import load_prepare_config
    from coca.prepare.pipeline import filter_task, list_tasks, run_prepare
    from coca.prepare.planted import planted_samples, score, write_shards

    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.time()
        samples, truth = planted_samples(args.distinct, args.copies, seed=0, size=224)
        write_shards(samples, tmp / "in", 1000)
        print(f"built {len(samples)} samples ({args.copies} planted copies) in {time.time() - t0:.0f}s")

        cfg = load_prepare_config(None, ["workers=1", "filters.min_side=100"])
        task = list_tasks([str(tmp / "in" / "00000.tar")], cfg)[0]
        t0 = time.time()
        counts = filter_task(task, cfg, str(tmp / "single"))
        per_core = counts["input"] / (time.time() - t0)
        print(f"filter + hash, one process: {per_core:.0f} samples/s")

        cfg = load_prepare_config(None, [f"workers={args.workers}", "filters.min_side=100"])
        t0 = time.time()
        stats = run_prepare([str(tmp / "in")], str(tmp / "out"), cfg, log=lambda *a: None)
        total = time.time() - t0
        rejects = pq.read_table(tmp / "out" / "rejects.parquet").to_pylist()
        uid_to_key = {r["uid"]: r["key"] for r in rejects}
        for shard in sorted((tmp / "out").glob("*.tar")):
            with tarfile.open(shard) as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        info = json.loads(tf.extractfile(m).read())
                        uid_to_key[info["key"]] = info["source_key"]
        result = score(rejects, uid_to_key, truth)
        by_kind = {}
        removed = {uid_to_key[r["uid"]] for r in rejects if r["reason"].startswith("duplicate_")}
        from coca.prepare.planted import COPY_KINDS
        for j, kind in enumerate(COPY_KINDS):
            keys = [f"c{i:07d}" for i in range(j, args.copies, len(COPY_KINDS))]
            # a copy counts as found if it, or its original, was removed (one of each group stays)
            by_kind[kind] = sum(k in removed or truth[k] in removed for k in keys) / len(keys)
        out = {"samples": len(samples), "planted_copies": args.copies, **result, "found_by_copy_kind": by_kind,
               "filter_hash_samples_per_s_one_process": round(per_core, 1), "workers": args.workers,
               "whole_job_seconds": round(total, 1), "whole_job_samples_per_s": round(len(samples) / total, 1),
               "stats": stats}
        print(json.dumps({k: v for k, v in out.items() if k != "stats"}, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
