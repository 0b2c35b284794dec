"""The demo's training step by precision: fp32, BF16 autocast with bf16 attention (how BF16 ran
before ``models/attention.py``), and BF16 autocast with fp32 attention (now); plus this CPU's
fp32 and bf16 matmul rates at the demo's shapes.

Run (from the repository root; about 1 minute on 2 cores):

    .venv/bin/python benchmarks/demo_step.py --json benchmarks/results/demo_step.json
    .venv/bin/python benchmarks/demo_step.py --packing --json benchmarks/results/demo_step_packing.json

``configs/demo.yaml`` (coca-tiny as the demo trains it), one Trainer per row, the same 8 batches
of the demo's data for every row (drawn once, before timing, so data loading is not timed).
Each repetition runs every row over the 8 batches in turn (2 untimed steps first); the table
reports the median seconds per step over the repetitions. The bf16-attention row sets its model's
attention to ``SDPA`` (attention and its position bias in the autocast dtype, as before) in place
of the ``SDPA_FP32`` that BF16 training on CPU chooses.
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

import torch


def matmul_rates() -> dict:
    """GFLOP/s of [4160, 128] x [128, 384] (the vision tower's QKV at batch 64) in fp32 and bf16."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(4160, 128, dtype=dtype), torch.randn(128, 384, dtype=dtype)
        for _ in range(5):
            a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                a @ b
            times.append((time.perf_counter() - t0) / 20)
        out[str(dtype).removeprefix("torch.")] = round(2 * 4160 * 128 * 384 / statistics.median(times) / 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--packing", action="store_true",
                   help="rows: the demo's step with padded and with packed text towers (train.pack_text), its own precision")
    p.add_argument("--json")
    args = p.parse_args()
    from coca.config import load_run_config
    from coca.data.loader import train_batches
    from coca.demo import DEMO_CONFIG
    from coca.models.attention import SDPA, set_attention
    from coca.train.loop import Trainer

    rows = {"fp32": ("fp32", None, []), "bf16, bf16 attention (before)": ("bf16", SDPA, []),
            "bf16, fp32 attention (now)": ("bf16", None, [])}
    if args.packing:
        rows = {"padded text": ("auto", None, ["train.pack_text=false"]),
                "packed text": ("auto", None, ["train.pack_text=true"])}
    tmp = tempfile.mkdtemp()
    trainers = {}
    for name, (precision, attention, extra) in rows.items():
        cfg = load_run_config(str(DEMO_CONFIG), [f"train.run_dir={tmp}/{len(trainers)}", "data.workers=0",
                                                 f"train.precision={precision}", *extra])
        trainer = Trainer(cfg, log=lambda *a: None)
        trainer.setup()
        if attention is not None:
            set_attention(trainer.parts.model, attention)
        trainers[name] = trainer
    first = next(iter(trainers.values()))
    stream = train_batches(cfg.data, cfg.model.vision.image_size, first.parts.tokenizer, 0)
    batches = [[(b["images"], b["tokens"])] for b in (next(stream) for _ in range(8))]
    times = {name: [] for name in rows}
    for rep in range(args.reps):
        for name, trainer in trainers.items():
            for micro in batches[:2]:
                trainer.train_step(micro)
            t0 = time.perf_counter()
            for micro in batches:
                trainer.train_step(micro)
            times[name].append((time.perf_counter() - t0) / len(batches))
    from coca.cpu import cpu_description
    result = {"benchmark": "demo_step", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps,
              "cpu": cpu_description(),
              "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "matmul_gflops": matmul_rates(),
              "rows": [{"row": name, "median_s": round(statistics.median(t), 4), "per_rep_s": [round(x, 4) for x in t]}
                       for name, t in times.items()]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
