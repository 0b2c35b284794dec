"""What patch dropout does to CoCa: zero-shot accuracy and captions at equal wall-clock, 3 seeds.

    .venv/bin/pip install scikit-learn   # its digits ship inside the package: no download
    .venv/bin/python benchmarks/patch_dropout.py --json benchmarks/results/patch_dropout.json

Two datasets, both trained with the demo's recipe (``configs/demo.yaml``: coca-tiny with 8-px
patches, 64 patch tokens per 64-px image):

* ``demo``: the demo's synthetic scenes, 800 steps of 64 without dropout; held out: zero-shot
  over the 18 colour x shape classes (540 images) and greedy captions of 300 two-object scenes
  (``coca.evaluate.synthetic``).
* ``digits``: scikit-learn's 1,797 handwritten digits (8 x 8 grey levels, each pixel one patch at
  64 px), captioned "a bold|light handwritten <digit>" (bold: more ink than the digit's median);
  1,497 to train on for 400 steps of 64, 300 held out: zero-shot over the 10 digits ("a
  handwritten {}"), greedy captions scored by exact match and CIDEr.

Each run without dropout takes its steps; a run with ``train.patch_dropout`` p (and FLIP's
unmasked tuning after ``patch_dropout_until`` = 0.95 of the steps) gets as many steps as fit in
the same training time, from the step times of a 200-step calibration run of each (measured
from step 50 on, in the same process, one after the other, on an otherwise idle machine). Seeds vary the initial weights, the data order and the
dropped patches (``train.seed``); the held-out sets stay fixed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matched  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "src" / "coca" / "configs" / "demo.yaml"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_dataset(root: Path, held_out: int = 300) -> dict:
    """scikit-learn's digits as a CSV of 64-px PNGs and captions, plus the held-out images."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    ink = d.images.sum((1, 2))
    median = {k: np.median(ink[d.target == k]) for k in range(10)}
    root.mkdir(parents=True, exist_ok=True)
    rows, test = ["filepath,caption"], []
    for rank, i in enumerate(order):
        k = int(d.target[i])
        weight = "bold" if ink[i] > median[k] else "light"
        caption = f"a {weight} handwritten {DIGITS[k]}"
        pixels = (d.images[i] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(pixels, "L").resize((64, 64), Image.NEAREST).convert("RGB")
        if rank < len(order) - held_out:
            image.save(root / f"{i:04d}.png")
            rows.append(f"{i:04d}.png,{caption}")
        else:
            test.append((image, k, caption))
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return {"csv": str(root / "train.csv"), "test": test}


def evaluate_digits(model, tokenizer, test) -> dict:
    from coca.data import eval_transform
    from coca.evaluate.captioning import cider, exact_match
    from coca.evaluate.zeroshot import class_embeddings, zero_shot_logits
    model.eval()
    transform = eval_transform(model.cfg.vision.image_size)
    images = torch.stack([transform(im) for im, _, _ in test])
    classifier = class_embeddings(model, tokenizer, DIGITS, ["a handwritten {}"])
    with torch.no_grad():
        predicted = zero_shot_logits(model, images, classifier).argmax(-1)
        texts = tokenizer.decode(model.generate(images, max_new_tokens=12, strategy="greedy"))
    truth = torch.tensor([k for _, k, _ in test])
    references = [[c] for _, _, c in test]
    return {"zeroshot": float((predicted == truth).float().mean()), "exact_match": exact_match(texts, references),
            "cider": cider(texts, references)}


def evaluate_demo(model, tokenizer, seed: int = 0) -> dict:
    from coca.evaluate.synthetic import evaluate_synthetic
    r = evaluate_synthetic(model, tokenizer, seed=seed)
    return {"zeroshot": r.zeroshot_accuracy, "exact_match": r.caption_exact_match, "cider": r.cider}


def train_run(run_dir: Path, overrides: list[str]) -> tuple[object, float, list[dict]]:
    """Trains with the demo's recipe and ``overrides``; the model, the training seconds and the log."""
    from coca.config import load_run_config
    from coca.models.coca import load
    from coca.train import train
    cfg = load_run_config(str(DEMO), [f"train.run_dir={run_dir}", *overrides])
    t0 = time.perf_counter()
    summary = train(cfg, log=lambda *a, **k: None)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return load(summary["model_dir"]), seconds, [r for r in rows if "elapsed_s" in r and r.get("split") in (None, "train")]


def step_seconds(rows: list[dict], skip: int) -> float:
    """Seconds per step from the first logged step past ``skip`` to the last (past the start-up
    and the loader's first prefetched batches, which would flatter a data-bound step)."""
    rows = [r for r in rows if r["step"] >= skip]
    first, last = rows[0], rows[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["demo", "digits"], choices=["demo", "digits"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--scale", type=float, default=1.0, help="scale every run's steps (a quick check: 0.05)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    from coca.cpu import cpu_description
    results = {"benchmark": "patch_dropout", "cpu": cpu_description(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "ratio": args.ratio, "seeds": args.seeds, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.datasets:
            if name == "demo":
                data, steps, evaluate = [], 800, evaluate_demo
            else:
                digits = digits_dataset(tmp / "digits")
                data = ["data.kind=csv", f"data.train={digits['csv']}", "data.synthetic_val_size=16",
                        "train.val_every=0"]
                steps, evaluate = 400, (lambda m, t, test=digits["test"]: evaluate_digits(m, t, test))
            steps, calibration = max(20, round(steps * args.scale)), max(20, round(200 * args.scale))
            # the calibration: the step time of each, one after the other
            times = {}
            for ratio in (0.0, args.ratio):
                _, _, rows = train_run(tmp / f"{name}_calib_{ratio}", data + [
                    f"train.steps={calibration}", f"train.checkpoint_every={calibration}", f"train.patch_dropout={ratio}",
                    "train.patch_dropout_until=1.0"])
                times[ratio] = step_seconds(rows, calibration // 4)
            dropout_steps = round(steps * times[0.0] / times[args.ratio])
            print(f"# {name}: {times[0.0]:.3f} s/step without dropout, {times[args.ratio]:.3f} with "
                  f"{args.ratio}: {steps} vs {dropout_steps} steps", flush=True)
            for seed in args.seeds:
                for ratio, n in ((0.0, steps), (args.ratio, dropout_steps)):
                    model, seconds, _ = train_run(tmp / f"{name}_{ratio}_{seed}", data + [
                        f"train.steps={n}", f"train.checkpoint_every={n}", f"train.seed={seed}",
                        f"train.patch_dropout={ratio}"])
                    metrics = evaluate(model, model.tokenizer)
                    run = {"dataset": name, "patch_dropout": ratio, "seed": seed, "steps": n,
                           "train_s": seconds, "step_s_calibration": times[ratio], **metrics}
                    results["runs"].append(run)
                    print(json.dumps(run), flush=True)
    table = []
    for name in args.datasets:
        for ratio in (0.0, args.ratio):
            runs = [r for r in results["runs"] if r["dataset"] == name and r["patch_dropout"] == ratio]
            cell = lambda k: f"{statistics.mean(r[k] for r in runs):.3f} ± {statistics.pstdev(r[k] for r in runs):.3f}"  # noqa: E731
            table.append([name, f"{ratio:g}", str(runs[0]["steps"]), f"{statistics.mean(r['train_s'] for r in runs):.0f}",
                          cell("zeroshot"), cell("exact_match"), cell("cider")])
    print()
    print(matched.markdown_table(["data", "patch dropout", "steps", "train s", "zero-shot top-1",
                                  "caption exact match", "CIDEr"], table))
    matched.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
