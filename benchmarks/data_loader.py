"""Data loader throughput from webdataset shards: decode + augment + tokenize, samples/s per core.

Run (from the repository root; about 2 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/data_loader.py --json benchmarks/results/data_loader.json

Writes webdataset shards into a temporary directory (img2dataset layout: ``{key}.jpg`` JPEG
quality 90 of a synthetic scene rendered at ``--source-size`` px, ``{key}.txt`` its caption,
``{key}.json``), then reads them through the training pipeline itself
(``coca.data.loader.train_batches``: tar reading, JPEG decode, random resized crop to the model
size, flip, colour jitter, normalise, SentencePiece tokenization, collation and trimming).
Each row: ``data.workers`` worker processes, one untimed batch to start the workers, then the
time for ``--batches`` batches of 64; the median of ``--repeats`` runs. The main process only
receives batches, so samples/s divided by the number of workers is the throughput of one core.
Rows: 224 px output from 384 px JPEGs (a web-scale training setting), and 64 px output from
64 px JPEGs (the demo's size).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def write_shards(out: Path, n_samples: int, n_shards: int, source_size: int) -> str:
    from coca.data.synthetic import SyntheticScenes
    scenes = SyntheticScenes(n_samples, image_size=source_size)
    per = -(-n_samples // n_shards)
    for s in range(n_shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            for i in range(s * per, min(n_samples, (s + 1) * per)):
                image, caption = scenes.load(i)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": f"{i:09d}"}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(out / f"{{00000..{n_shards - 1:05d}}}.tar")


def measure(pattern: str, image_size: int, tokenizer, workers: int, batches: int, batch_size: int) -> float:
    from coca.config import DataConfig
    from coca.data.loader import train_batches
    cfg = DataConfig(kind="webdataset", train=pattern, batch_size=batch_size, workers=workers, shuffle_buffer=1000)
    it = train_batches(cfg, image_size, tokenizer, seed=0)
    next(it)  # start the workers
    t0 = time.perf_counter()
    n = sum(next(it)["images"].shape[0] for _ in range(batches))
    elapsed = time.perf_counter() - t0
    del it
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    from coca.data.synthetic import SyntheticScenes, caption_for
    from coca.tokenizer import Tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = Tokenizer.train([caption_for(SyntheticScenes(5000).scene(i)) for i in range(5000)], vocab_size=64,
                              out_dir=tmp, model_type="bpe")
        for source_size, image_size in ((384, 224), (64, 64)):
            shard_dir = tmp / f"src{source_size}"
            shard_dir.mkdir()
            pattern = write_shards(shard_dir, args.samples, args.shards, source_size)
            for workers in (1, 2):
                runs = [measure(pattern, image_size, tok, workers, args.batches, args.batch_size)
                        for _ in range(args.repeats)]
                rate = statistics.median(runs)
                rows.append({"source_px": source_size, "output_px": image_size, "workers": workers,
                             "samples_per_s": round(rate, 1), "samples_per_s_per_worker": round(rate / workers, 1),
                             "runs": [round(r, 1) for r in runs]})
                print(f"{source_size:>4} px JPEG -> {image_size:>3} px, {workers} worker(s): {rate:7.1f} samples/s "
                      f"({rate / workers:6.1f} per worker)")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "batches": args.batches,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
