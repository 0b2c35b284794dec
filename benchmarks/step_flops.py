"""FLOPs of one training step (forward + backward, loss included, optimizer not) of ours and
open_clip's CoCa at the matched size, batch 16, captions padded to the full 77 positions on both
sides (``benchmarks/train_step.py --no-trim``'s inputs).

Run (from the repository root; about a minute):

    .venv/bin/python benchmarks/step_flops.py --json benchmarks/results/step_flops.json

Counted with ``coca.summary.flop_counter`` (PyTorch's ``FlopCounterMode`` plus the CPU attention
kernels it does not know, which both models dispatch to on a CPU), and with the plain
``FlopCounterMode`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402
from train_step import build, make_batch  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args()
    from torch.utils.flop_counter import FlopCounterMode

    from coca.summary import flop_counter
    torch.set_num_threads(2)
    size = matched.Size()
    images, tokens = make_batch(args.batch, 76, size.image_size, size.vocab, 0)
    result = {"benchmark": "step_flops", "batch": args.batch, "positions": 77}
    for which in ("ours", "open_clip"):
        model, loss_fn = build(which, size)
        for counted, mode in (("with_cpu_attention", flop_counter), ("plain", lambda: FlopCounterMode(display=False))):
            with mode() as counter:
                loss_fn(model, images, tokens).backward()
            result[f"{which}_gflop_{counted}"] = round(counter.get_total_flops() / 1e9, 1)
            model.zero_grad(set_to_none=True)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
