"""The built-in demo on the tiny preset: no downloads, a few seconds on a laptop CPU.

It trains a SentencePiece tokenizer on generated captions, builds ``coca-tiny``, runs a forward
pass with both losses, generates captions greedily and with beam search (checking the KV cache
against full recomputation), saves the model directory and loads it back.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .io import atomic_write_text
from .models.coca import create_model, load
from .summary import parameter_counts
from .tokenizer import Tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]


def demo_captions() -> list[str]:
    one = [f"a {s} {c} {sh}" for s, c, sh in itertools.product(SIZES, COLOURS, SHAPES)]
    two = [f"{a} {rel} of {b}" for a, b in itertools.product(one[:12], one[-12:]) for rel in ("left", "right")]
    return one + two


def run_demo(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    tok = Tokenizer.train(demo_captions() * 4, vocab_size=64, out_dir=out / "tokenizer")
    model = create_model("coca-tiny").eval()
    counts = parameter_counts(model)
    print(f"coca-tiny: {counts['total']:,} parameters; tokenizer: {tok.vocab_size} pieces")

    images = torch.randn(4, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    tokens = tok.encode(demo_captions()[:4])
    with torch.no_grad():
        outputs = model(images, tokens)
    logits = outputs["logit_scale"] * outputs["image_embeds"] @ outputs["text_embeds"].T
    labels = torch.arange(len(images))
    contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    caption = F.cross_entropy(outputs["logits"].flatten(0, 1), tokens.flatten(), ignore_index=tok.pad_id)
    print(f"forward: contrastive loss {contrastive:.3f}, caption loss {caption:.3f} (random weights)")

    report = {"parameters": counts["total"], "contrastive_loss": float(contrastive), "caption_loss": float(caption)}
    for strategy in ("greedy", "beam"):
        t = time.time()
        cached = model.generate(images, max_new_tokens=20, strategy=strategy)
        cached_s = time.time() - t
        t = time.time()
        full = model.generate(images, max_new_tokens=20, strategy=strategy, use_cache=False)
        full_s = time.time() - t
        same = torch.equal(cached, full)
        print(f"{strategy:>6}: cached == uncached tokens: {same}; {full_s / cached_s:.1f}x faster with the KV cache")
        print(f"        e.g. {tok.decode(cached[0])!r} (untrained weights: not yet a caption)")
        report[f"{strategy}_cache_exact"] = same

    model_dir = model.save_pretrained(out / "model", tokenizer=tok)
    reloaded = load(model_dir)
    with torch.no_grad():
        same = torch.allclose(reloaded.encode_image(images), outputs["image_embeds"], atol=1e-6)
    report["reload_exact"] = same
    report["wall_time_s"] = round(time.time() - t0, 2)
    atomic_write_text(out / "demo.json", json.dumps(report, indent=2) + "\n")
    print(f"saved and reloaded {model_dir} (identical embeddings: {same}); report in {out / 'demo.json'}; "
          f"{report['wall_time_s']}s")
    return report
