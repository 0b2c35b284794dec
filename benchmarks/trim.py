"""What trimming each batch to its longest caption buys at realistic micro-batches and caption
lengths: our training step with and without ``coca.tokenizer.trim_padding``.

Run (from the repository root; about 6 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/trim.py --json benchmarks/results/trim.json

The model is ours at the matched size (``benchmarks/matched.py``, 103M parameters, fp32, train
mode), one step = zero_grad, forward, contrastive + caption loss, backward, AdamW step (the step of
``benchmarks/train_step.py``). Captions follow a COCO-like length distribution — not COCO itself,
which is not available offline: words ~ lognormal around 10.2 (sigma 0.22, as COCO's mean of
~10.5 words and few captions beyond 20), plus 1 in 200 a long caption of 20-50 words; tokens =
ceil(1.3 x words) + EOS, at most 76. With many captions per batch the longest is often far above
the mean, so trimming saves less than the mean length suggests; the table shows the longest
caption of each batch next to the time.

Micro-batch 64 by default: at 256 the untrimmed step needs about 4 x 9.3 GB, more than this
machine's 24 GB (a run with ``--batches 64,256`` was killed by the kernel there).

Rows per micro-batch: trimmed (the text towers run on the batch's longest caption) and untrimmed
(all 77 positions). Each repetition runs both, alternating the order; medians are reported.
Peak memory: two steps of each in a fresh subprocess, peak RSS (VmHWM) minus the RSS before the
model was built.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402
from train_step import build, caption_lengths, make_step, peak_rss_kb, tokens_of_lengths  # noqa: E402

TEXT_LEN = 76


def coco_like_tokens(batch: int, vocab: int, seed: int) -> torch.Tensor:
    return tokens_of_lengths(caption_lengths("coco", batch, TEXT_LEN, seed), TEXT_LEN, vocab, seed)


def batch_for(batch: int, size, seed: int, trim: bool):
    from coca.tokenizer import trim_padding
    images = torch.randn(batch, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(seed))
    tokens = coco_like_tokens(batch, size.vocab, seed)
    return images, trim_padding(tokens) if trim else tokens


def memory_child(batch: int, trim: bool, seed: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    size = matched.Size()
    images, tokens = batch_for(batch, size, seed, trim)
    base = peak_rss_kb()
    model, loss_fn = build("ours", size)
    step = make_step(model, loss_fn, images, tokens, False, 1e-4)
    step()
    step()
    return {"peak_delta_mb": round((peak_rss_kb() - base) / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64", help="comma-separated micro-batches (256 untrimmed needs ~37 GB)")
    p.add_argument("--reps", default="5", help="timed steps per row, per batch size (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)  # BATCH TRIM(0/1)
    args = p.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(int(args.memory_child[0]), args.memory_child[1] == "1", args.seed)))
        return 0
    torch.set_num_threads(2)
    size = matched.Size()
    model, loss_fn = build("ours", size)
    rows = []
    for batch, reps in zip(map(int, args.batches.split(",")), map(int, args.reps.split(","))):
        seeds = list(range(args.seed, args.seed + reps))  # a fresh batch of captions per repetition
        longest = [int((coco_like_tokens(batch, size.vocab, s) != 0).sum(1).max()) for s in seeds]
        times = {"trimmed": [], "untrimmed": []}
        for trim in (True, False):  # untimed warm-up (allocates AdamW state)
            make_step(model, loss_fn, *batch_for(batch, size, args.seed, trim), False, 1e-4)()
        for r, seed in enumerate(seeds):
            for name in (("trimmed", "untrimmed") if r % 2 == 0 else ("untrimmed", "trimmed")):
                step = make_step(model, loss_fn, *batch_for(batch, size, seed, name == "trimmed"), False, 1e-4)
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch": batch, "reps": reps, "longest_caption_tokens": longest,
               "mean_caption_tokens": round(float(np.mean([(coco_like_tokens(batch, size.vocab, s) != 0).sum(1).float()
                                                            .mean() for s in seeds])), 1),
               "trimmed_s": round(med["trimmed"], 3), "untrimmed_s": round(med["untrimmed"], 3),
               "trimmed_speedup": round(med["untrimmed"] / med["trimmed"], 2), "times_s": times}
        if not args.no_memory:
            for name, flag in (("trimmed", "1"), ("untrimmed", "0")):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", str(batch), flag,
                                      "--seed", str(args.seed)], check=True, capture_output=True, text=True).stdout
                row[f"{name}_peak_rss_delta_mb"] = json.loads(out.strip().splitlines()[-1])["peak_delta_mb"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
        result = {"benchmark": "trim", "size": vars(size), "threads": 2, "torch": torch.__version__,
                  "loadavg": os.getloadavg(), "rows": rows}
        if args.json:  # after every batch size: a larger one may not fit in memory
            with open(args.json, "w") as f:
                f.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
