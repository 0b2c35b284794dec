"""The compiled decoding step alone, per row count: as shipped, and as it ran before its two CPU
paths (every Linear left to inductor's packed GEMM instead of ``TwoRowLinearAsBatchedMatmul`` at
two rows, and SDPA instead of ``single_query_attention``): two ``CompiledDecoder`` of one model,
the "before" one with ``cpu_kernels=False``. The two-row path is on only on Intel CPUs
(``compiled_decoding.TWO_ROW_LINEAR_HELPS``); ``--two-row`` forces it on to measure it elsewhere.

Run (from the repository root; about 3 minutes on 2 cores):

    .venv/bin/python benchmarks/decode_step.py --json benchmarks/results/decode_step.json
    .venv/bin/python benchmarks/decode_step.py --two-row --json benchmarks/results/decode_step_two_row_no_amx.json

The matched decoder of ``benchmarks/generation_hf.py`` (512 wide, 6 layers, vocabulary 32,000,
random weights), fp32, 2 threads, 256 visual tokens. For each row count both variants are
compiled (their compile is untimed), then every repetition runs one step of each in turn at the
same position (cycling through 40) and the pair's time ratio is kept; the table reports the
median ms per step and the median of the paired ratios, so a change in the machine's load hits
both variants alike. The logits of both variants are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--reps", type=int, default=300, help="paired steps per row count")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--two-row", action="store_true", help="the two-row batched matmul on whatever the CPU")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from generation_hf import build

    from coca import compiled_decoding
    from coca.compiled_decoding import CompiledDecoder
    from coca.cpu import cpu_description
    if args.two_row:
        compiled_decoding.TWO_ROW_LINEAR_HELPS = True
    from coca.generation import _Stepper

    _, model = build(0, 32000, 512, 6, 2048)
    compiled = {"before": CompiledDecoder(model, cpu_kernels=False), "shipped": CompiledDecoder(model)}
    rows_out = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rows in map(int, args.rows.split(",")):
            visual = torch.randn(rows, 256, 512, generator=g)
            steps = {}
            for name in ("before", "shipped"):
                stepper = _Stepper(model, visual, 40, use_cache=True, compiled=compiled[name])
                cache = stepper.cache
                inputs = (stepper.token, stepper.position, [layer.k for layer in cache.layers],
                          [layer.v for layer in cache.layers], cache.cross, cache.bias_table)
                stepper.static_step(*inputs)  # the compile
                steps[name] = (stepper, inputs)
            logits = {}
            for name, (stepper, inputs) in steps.items():
                stepper.token.fill_(5)
                stepper.position.fill_(0)
                logits[name] = stepper.static_step(*inputs).clone()
            times = {name: [] for name in steps}
            for r in range(args.reps):
                for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                    stepper, inputs = steps[name]
                    stepper.position.fill_(r % 40)
                    t0 = time.perf_counter()
                    stepper.static_step(*inputs)
                    times[name].append(time.perf_counter() - t0)
            row = {"rows": rows,
                   **{f"{name}_ms_per_step": round(statistics.median(t) * 1e3, 2) for name, t in times.items()},
                   "before_over_shipped": round(statistics.median(
                       [a / b for a, b in zip(times["before"], times["shipped"])]), 3),
                   "max_abs_logit_difference": float((logits["before"] - logits["shipped"]).abs().max())}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "decode_step", "reps": args.reps, "threads": args.threads, "torch": torch.__version__,
              "cpu": cpu_description(), "two_row": compiled_decoding.TWO_ROW_LINEAR_HELPS,
              "loadavg": os.getloadavg(), "rows": rows_out}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
