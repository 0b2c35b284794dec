"""The demo model's evaluation table: `coca eval zeroshot|caption|retrieval` on held-out scenes, for
the trained model and the same architecture with random weights.

Run (from the repository root, after `make demo` or `coca demo --out runs/demo`; ~2 minutes):

    .venv/bin/coca synthetic --out runs/heldout
    .venv/bin/python benchmarks/demo_eval.py --model runs/demo/model --data runs/heldout \
        --json benchmarks/results/demo_eval.json

Each evaluation is the `coca eval` command a user runs (a subprocess, with its JSON output read
back), so the numbers are the commands' own: zero-shot with the scenes' class names and templates,
contrastive and then ``--method both`` (contrastive, likelihood, ensemble); captioning with beam
search of 3 (SPICE off: it needs a CoreNLP download); retrieval recall@1/5/10. The random-weights
model is ``coca.create_model(cfg)`` with seed 1, saved with the trained model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COCA = [sys.executable, "-m", "coca.cli"]


def run_eval(task: str, model: str, data: str, out: Path, *extra: str) -> dict:
    """One `coca eval TASK` run: its JSON output plus the wall time of the command."""
    args = ["--model", model, "--out", str(out), "--workers", "0"]
    if task == "zeroshot":
        args += ["--images", f"{data}/classify", "--classnames", f"{data}/classnames.txt",
                 "--templates", f"{data}/templates.txt"]
    else:
        args += ["--images", f"{data}/captions", "--annotations", f"{data}/captions.json"]
    t0 = time.perf_counter()
    subprocess.run([*COCA, "eval", task, *args, *extra], check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "metrics": result["metrics"]}


def evaluate(model: str, data: str, tmp: Path, likelihood: bool) -> dict:
    rows = {
        "zeroshot": run_eval("zeroshot", model, data, tmp / "zeroshot.json"),
        "caption": run_eval("caption", model, data, tmp / "caption.json", "--strategy", "beam", "--num-beams", "3",
                            "--no-spice"),
        "retrieval": run_eval("retrieval", model, data, tmp / "retrieval.json"),
    }
    if likelihood:
        rows["zeroshot_both"] = run_eval("zeroshot", model, data, tmp / "both.json", "--method", "both")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a trained model directory (e.g. runs/demo/model)")
    p.add_argument("--data", required=True, help="`coca synthetic --out` directory (held-out scenes)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    import coca
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trained = coca.load(args.model)
        torch.manual_seed(1)
        random_dir = coca.create_model(trained.cfg).save_pretrained(tmp / "random", tokenizer=trained.tokenizer)
        results = {"trained": evaluate(args.model, args.data, tmp, likelihood=True),
                   "random": evaluate(str(random_dir), args.data, tmp, likelihood=False)}
    out = {"benchmark": "demo_eval", "args": vars(args), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": os.getloadavg(), **results}
    print(json.dumps({k: {t: r["metrics"] for t, r in v.items()} for k, v in results.items()}, indent=1)[:4000])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
