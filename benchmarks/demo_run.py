"""`make demo`'s job, timed: `coca demo` in a fresh process, wall time from start-up to exit, and
the run's own metrics (held-out zero-shot accuracy, caption exact match, CIDEr, training time).

Run (from the repository root, on an otherwise idle machine; ~5 minutes on 2 cores):

    .venv/bin/python benchmarks/demo_run.py --out runs/demo_timed --json benchmarks/results/demo_run.json

and on a CPU without AMX (the JSON names the CPU and any kernel restriction in the environment):

    .venv/bin/python benchmarks/demo_run.py --json benchmarks/results/demo_run_no_amx.json
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        .venv/bin/python benchmarks/demo_run.py --json benchmarks/results/demo_run_avx2.json

The recipes it replaced, timed the same way (docs/performance.md's table of what bought the time):

    .venv/bin/python benchmarks/demo_run.py --set train.precision=fp32 --set data.augment.crop_scale_min=0.9 \
        --set data.augment.brightness=0.15 --set data.augment.contrast=0.15 --set data.augment.saturation=0.1 \
        --json benchmarks/results/demo_run_fp32_jitter.json
    .venv/bin/python benchmarks/demo_run.py --set train.precision=bf16 --set data.augment.crop_scale_min=0.9 \
        --set data.augment.brightness=0.15 --set data.augment.contrast=0.15 --set data.augment.saturation=0.1 \
        --json benchmarks/results/demo_run_bf16_jitter.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo_timed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a configs/demo.yaml override, as `coca demo --set` (repeatable): other recipes, timed alike")
    p.add_argument("--json")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    overrides = [x for o in ["train.progress=false", *args.set] for x in ("--set", o)]
    subprocess.run([sys.executable, "-m", "coca.cli", "demo", "--out", args.out, *overrides], check=True)
    wall = time.perf_counter() - t0
    metrics = json.loads((Path(args.out) / "metrics.json").read_text())
    from coca.cpu import cpu_description
    result = {"benchmark": "demo_run", "overrides": args.set, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cpu": cpu_description(), "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "wall_s_with_startup": round(wall, 1), "metrics": metrics}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
