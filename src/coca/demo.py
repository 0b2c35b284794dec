"""The main job on the built-in default: train coca-tiny on synthetic shape scenes and report.

No downloads. Steps: train a SentencePiece tokenizer on the synthetic captions, train the model
(`configs/demo.yaml`), evaluate on held-out scenes (zero-shot over 18 colour x shape classes,
greedy captions scored by exact match and CIDEr), and write a report into the run directory:
``curves.png``, ``gallery.png``, ``metrics.json`` and ``predictions.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import load_run_config
from .io import atomic_write_text
from .layout import RunLayout

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def run_demo(out_dir: str | Path, overrides: list[str] | None = None, log=print) -> dict:
    from .evaluate.synthetic import evaluate_synthetic
    from .models.coca import load
    from .train import train

    t0 = time.time()
    out = Path(out_dir)
    cfg = load_run_config(str(DEMO_CONFIG), [f"train.run_dir={out}", *(overrides or [])])
    log(f"training {cfg.model.name} ({cfg.train.steps} steps of {cfg.data.batch_size} synthetic scenes) in {out}")
    summary = train(cfg, log=log)
    train_s = time.time() - t0
    model = load(summary["model_dir"])
    t1 = time.time()
    results = evaluate_synthetic(model, model.tokenizer, seed=cfg.data.synthetic_seed)
    gallery = [{**c, "image": im} for c, im in zip(results.captions, results.images)]
    metrics = {
        "zeroshot_accuracy": results.zeroshot_accuracy,
        "caption_exact_match": results.caption_exact_match,
        "cider": results.cider,
        "n_zeroshot_images": results.n_classify, "n_caption_images": results.n_caption,
        "steps": summary["step"], "batch_size": cfg.data.batch_size,
        "final_train_loss": summary["last"].get("loss"), "skipped_samples": summary["skipped"],
        "train_time_s": round(train_s, 1), "eval_time_s": round(time.time() - t1, 1),
    }
    plot_curves(RunLayout(out).metrics, out / "curves.png")
    draw_gallery(gallery[:16], results.zeroshot_predictions, out / "gallery.png")
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out / "predictions.json", json.dumps(
        {"zeroshot": results.zeroshot_predictions, "captions": results.captions}, indent=1) + "\n")
    log(f"\nheld-out zero-shot accuracy ({results.zeroshot_classes} classes): {metrics['zeroshot_accuracy']:.3f}")
    log(f"held-out caption exact match: {metrics['caption_exact_match']:.3f}   CIDEr: {metrics['cider']:.3f}")
    for g in gallery[:3]:
        log(f"  generated {g['generated']!r}   reference {g['reference']!r}")
    log(f"wall time {metrics['wall_time_s']:.0f}s (training {metrics['train_time_s']:.0f}s)")
    log(f"report: {out / 'metrics.json'}, {out / 'curves.png'}, {out / 'gallery.png'}; model: {summary['model_dir']}")
    return metrics


def plot_curves(metrics_file: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("split") != "val"]
    val_rows = [r for r in rows if r.get("split") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train_rows]
    for key in ("loss", "contrastive_loss", "caption_loss"):
        axes[0].plot(steps, [r[key] for r in train_rows], label=key)
    if val_rows:
        axes[0].plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o--", label="val_loss")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("training loss")
    axes[1].plot(steps, [r["lr"] for r in train_rows], label="learning rate")
    axes[1].set_xlabel("step")
    twin = axes[1].twinx()
    twin.plot(steps, [r["logit_scale"] for r in train_rows], color="tab:red", label="logit scale")
    axes[1].set_title("learning rate (blue) and logit scale (red)")
    fig.tight_layout()
    _save_figure(fig, out)
    plt.close(fig)


def draw_gallery(items: list[dict], zeroshot: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 4
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.3))
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ok = item["generated"] == item["reference"]
        ax.imshow(item["image"])
        ax.set_title(_wrap(item["generated"]) + ("" if ok else f"\n(ref: {_wrap(item['reference'])})"),
                     fontsize=7, color="green" if ok else "red")
    wrong = sum(z["truth"] != z["predicted"] for z in zeroshot)
    fig.suptitle(f"held-out scenes: greedy captions (green = exact match); zero-shot errors: {wrong}/{len(zeroshot)}",
                 fontsize=9)
    fig.tight_layout()
    _save_figure(fig, out)
    plt.close(fig)


def _wrap(text: str, width: int = 34) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def _save_figure(fig, path: Path) -> None:
    import io

    from .io import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
