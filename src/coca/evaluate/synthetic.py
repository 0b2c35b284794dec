"""The held-out evaluation of the synthetic shape scenes (what `make demo` reports).

- zero-shot accuracy over the 18 colour x shape classes on single-object scenes;
- exact match and CIDEr of greedy captions on one-or-two-object scenes (one canonical caption each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.synthetic import SyntheticScenes, caption_for, class_names
from ..data.transforms import eval_transform
from .captioning import cider, exact_match
from .zeroshot import class_embeddings, zero_shot_logits

ZERO_SHOT_TEMPLATES = ["a small {}", "a large {}"]


@dataclass
class SyntheticResult:
    zeroshot_accuracy: float
    zeroshot_classes: int
    caption_exact_match: float
    cider: float
    n_classify: int
    n_caption: int
    zeroshot_predictions: list[dict]    # {"index", "truth", "predicted"}
    captions: list[dict]                # {"index", "reference", "generated"}
    images: list = field(repr=False)    # the captioned scenes (PIL images), in the order of ``captions``


@torch.no_grad()
def evaluate_synthetic(model, tokenizer, n_classify: int = 540, n_caption: int = 300, seed: int = 0,
                       batch_size: int = 128, max_new_tokens: int = 30) -> dict:
    model.eval()
    device = next(model.parameters()).device
    size = model.cfg.vision.image_size
    transform = eval_transform(size)
    names = class_names()

    singles = SyntheticScenes(n_classify, split="test", seed=seed, image_size=size, max_objects=1)
    classifier = class_embeddings(model, tokenizer, names, ZERO_SHOT_TEMPLATES)
    correct, predictions = 0, []
    for start in range(0, n_classify, batch_size):
        idx = range(start, min(n_classify, start + batch_size))
        images = torch.stack([transform(singles.load(i)[0]) for i in idx]).to(device)
        pred = zero_shot_logits(model, images, classifier).argmax(-1).tolist()
        for i, p in zip(idx, pred):
            obj = singles.scene(i)[0]
            truth = f"{obj.colour} {obj.shape}"
            correct += names[p] == truth
            predictions.append({"index": i, "truth": truth, "predicted": names[p]})

    scenes = SyntheticScenes(n_caption, split="test", seed=seed, image_size=size, max_objects=2)
    generated, references, gallery = [], [], []
    for start in range(0, n_caption, batch_size):
        idx = range(start, min(n_caption, start + batch_size))
        pil = [scenes.load(i)[0] for i in idx]
        images = torch.stack([transform(im) for im in pil]).to(device)
        texts = tokenizer.decode(model.generate(images, max_new_tokens=max_new_tokens, strategy="greedy"))
        for i, im, text in zip(idx, pil, texts):
            ref = caption_for(scenes.scene(i))
            generated.append(text)
            references.append([ref])
            gallery.append({"index": i, "image": im, "reference": ref, "generated": text})
    return SyntheticResult(
        zeroshot_accuracy=correct / n_classify, zeroshot_classes=len(names),
        caption_exact_match=exact_match(generated, references), cider=cider(generated, references),
        n_classify=n_classify, n_caption=n_caption, zeroshot_predictions=predictions,
        captions=[{k: v for k, v in g.items() if k != "image"} for g in gallery],
        images=[g["image"] for g in gallery])


def write_eval_sets(out_dir, n_classify: int = 540, n_caption: int = 300, seed: int = 0, image_size: int = 64,
                    split: str = "test") -> dict:
    """Write held-out synthetic scenes to disk in the layouts the `coca eval` commands read:

        OUT/classify/<colour>_<shape>/<index>.png   ImageNet-style folder of single-object scenes
        OUT/classnames.txt, OUT/templates.txt       its class names (sorted folder order) and prompts
        OUT/captions/<index>.png, OUT/captions.json one-or-two-object scenes, COCO captions format
    """
    import json
    from pathlib import Path

    from ..io import atomic_write_text
    out = Path(out_dir)
    names = class_names()
    folders = sorted(n.replace(" ", "_") for n in names)
    for folder in folders:
        (out / "classify" / folder).mkdir(parents=True, exist_ok=True)
    singles = SyntheticScenes(n_classify, split=split, seed=seed, image_size=image_size, max_objects=1)
    for i in range(n_classify):
        image, _ = singles.load(i)
        obj = singles.scene(i)[0]
        image.save(out / "classify" / f"{obj.colour}_{obj.shape}" / f"{i:05d}.png")
    atomic_write_text(out / "classnames.txt", "".join(f.replace("_", " ") + "\n" for f in folders))
    atomic_write_text(out / "templates.txt", "".join(t + "\n" for t in ZERO_SHOT_TEMPLATES))
    (out / "captions").mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(n_caption, split=split, seed=seed, image_size=image_size, max_objects=2)
    images, annotations = [], []
    for i in range(n_caption):
        image, caption = scenes.load(i)
        image.save(out / "captions" / f"{i:05d}.png")
        images.append({"id": i, "file_name": f"{i:05d}.png", "width": image_size, "height": image_size})
        annotations.append({"id": i, "image_id": i, "caption": caption})
    atomic_write_text(out / "captions.json", json.dumps({"images": images, "annotations": annotations}) + "\n")
    return {"classify": str(out / "classify"), "classnames": str(out / "classnames.txt"),
            "templates": str(out / "templates.txt"), "captions": str(out / "captions"),
            "annotations": str(out / "captions.json")}
