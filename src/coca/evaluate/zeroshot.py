"""Zero-shot classification as in CLIP: class embedding = mean of its normalised prompt
embeddings, renormalised; prediction = nearest class embedding to the image embedding.

Ships the 1,000 ImageNet class names and the 80 prompt templates CLIP used
(``evaluate/data/imagenet_classnames.txt``, ``imagenet_templates.txt``).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ZEROSHOT_METHODS as METHODS, ZeroShotMethod
from ..errors import InputNotFound, UserError
from ..loading import to_model
from .common import image_batches, read_text_list, skip_counts

DATA_DIR = Path(__file__).parent / "data"
IMAGENET_CLASSNAMES = DATA_DIR / "imagenet_classnames.txt"
IMAGENET_TEMPLATES = DATA_DIR / "imagenet_templates.txt"


def load_templates(path: str | os.PathLike) -> list[str]:
    """One prompt template per line, each with exactly one ``{}`` for the class name."""
    templates = read_text_list(path, "templates")
    for n, t in enumerate(templates, 1):
        check_template(t, where=f"{path}: line {n}")
    return templates


def check_template(template: str, where: str = "template") -> None:
    if template.count("{}") != 1:
        raise UserError(f"{where}: template {template!r} needs exactly one '{{}}' for the class name")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise UserError(f"{where}: template {template!r} is not a valid format string ({e}); "
                         "write literal braces as '{{' and '}}'") from None


def load_classnames(path: str | os.PathLike) -> list[str]:
    return read_text_list(path, "class names")


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names: list[str], templates: list[str], batch_size: int = 256) -> torch.Tensor:
    """[C, E] normalised class embeddings (mean of the normalised template embeddings, renormalised)."""
    device = next(model.parameters()).device
    out = []
    for name in class_names:
        prompts = [t.format(name) for t in templates]
        embeds = torch.cat([model.encode_text(tokenizer.encode(prompts[i:i + batch_size]).to(device))
                            for i in range(0, len(prompts), batch_size)])
        out.append(F.normalize(embeds.mean(0), dim=-1))
    return torch.stack(out)


@torch.no_grad()
def zero_shot_logits(model, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[B, C] cosine similarities of images to the class embeddings."""
    return model.encode_image(images) @ classifier.T


@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    mapping: str      # how labels were assigned: "by name", "sorted folder order", "folder names", "labels file"


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def labelled_images(images: str | os.PathLike, labels_file: str | os.PathLike | None = None,
                    classnames: list[str] | None = None) -> LabelledImages:
    """Image paths, class indices and class names for a zero-shot evaluation.

    - ``labels_file`` None: ``images`` is an ImageNet-style folder, one sub-folder per class.
      Without ``classnames`` the folder names are the class names. With them, folders are matched
      to names by name when every folder name equals a class name (ignoring case and '_' vs
      space), whatever the order of the names file; otherwise sorted folder i is class i (how the
      ImageNet validation synset folders map to the standard class order). ``mapping`` says which.
    - ``labels_file``: a CSV/TSV of ``image,label`` rows (a header row is allowed), image paths
      relative to ``images``, label a class name or else a class index (a label that is a class
      name is that class, also when the names are numbers).
    """
    from ..data.readers import FolderSource
    root = Path(images)
    if not root.is_dir():
        raise InputNotFound(f"image directory {str(root)!r} not found")
    if labels_file is None:
        folder = FolderSource(root)
        if classnames is None:
            return LabelledImages(list(folder.samples), list(folder.labels), folder.class_names, "folder names")
        if len(classnames) != len(folder.classes):
            raise UserError(f"{root} has {len(folder.classes)} class folders but {len(classnames)} class names "
                             "were given")
        index_of = {_name_key(n): i for i, n in enumerate(classnames)}
        if len(index_of) == len(classnames) and all(_name_key(c) in index_of for c in folder.classes):
            by_folder = [index_of[_name_key(c)] for c in folder.classes]
            return LabelledImages(list(folder.samples), [by_folder[label] for label in folder.labels],
                                  list(classnames), "by name")
        return LabelledImages(list(folder.samples), list(folder.labels), list(classnames), "sorted folder order")
    if classnames is None:
        raise UserError("a labels file needs class names (--classnames FILE or --dataset imagenet)")
    return LabelledImages(*_read_labels_file(Path(labels_file), root, classnames), list(classnames), "labels file")


def _read_labels_file(path: Path, root: Path, classnames: list[str]) -> tuple[list[Path], list[int]]:
    if not path.is_file():
        raise InputNotFound(f"labels file {str(path)!r} not found")
    text = path.read_text(encoding="utf-8", errors="strict")
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    index_of = {name: i for i, name in reversed(list(enumerate(classnames)))}
    paths, labels = [], []
    for n, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise UserError(f"{path}: line {n}: expected 'image{delimiter}label', got {row!r}")
        name, label = row[0].strip(), row[1].strip()
        if label in index_of:  # class names are text, numbers included ("1".."4"): a name first
            idx = index_of[label]
        elif label.lstrip("-").isdigit():
            idx = int(label)
            if not 0 <= idx < len(classnames):
                raise UserError(f"{path}: line {n}: label {idx} is outside [0, {len(classnames)})")
        elif n == 1:  # header row
            continue
        else:
            raise UserError(f"{path}: line {n}: label {label!r} is neither a class index nor a class name")
        paths.append(root / name)
        labels.append(idx)
    if not paths:
        raise UserError(f"labels file {path} has no image,label rows")
    return paths, labels




def prompt_tokens(tokenizer, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """[C * M, L] tokens of every class's prompts, class-major (row c * M + m)."""
    return tokenizer.encode([t.format(name) for name in class_names for t in templates])


@torch.no_grad()
def likelihood_logits(model, images: torch.Tensor, prompts: torch.Tensor, n_classes: int,
                      batch_size: int = 64) -> torch.Tensor:
    """[B, C] generative zero-shot scores (CoCa): log p(prompt | image) under the decoder, each
    class's templates pooled as a mixture, log(mean_m p(prompt_cm | image))."""
    loglik = model.score(images, prompts.to(images.device), pairwise=True, batch_size=batch_size).sum
    per_template = loglik.view(images.shape[0], n_classes, -1)
    return per_template.logsumexp(-1) - math.log(per_template.shape[-1])


class _Tally:
    """Top-1 / top-5 / per-class counts of one scoring method."""

    def __init__(self, n_classes: int):
        self.total, self.correct1, self.correct5 = 0, 0, 0
        self.per_class_total, self.per_class_correct = [0] * n_classes, [0] * n_classes

    def add(self, probs: torch.Tensor, truth: list[int]) -> tuple[list, list]:
        top_p, top_i = probs.topk(min(5, probs.shape[-1]), dim=-1)
        top_p, top_i = top_p.tolist(), top_i.tolist()
        for t, cs in zip(truth, top_i):
            self.total += 1
            self.correct1 += cs[0] == t
            self.correct5 += t in cs
            self.per_class_total[t] += 1
            self.per_class_correct[t] += cs[0] == t
        return top_p, top_i

    def per_class(self, classnames: list[str]) -> list[dict]:
        return [{"class": c, "name": classnames[c], "n": self.per_class_total[c],
                 "top1": self.per_class_correct[c] / self.per_class_total[c]}
                for c in range(len(classnames)) if self.per_class_total[c]]

    def metrics(self, classnames: list[str]) -> dict[str, float]:
        per_class = self.per_class(classnames)
        return {"top1": self.correct1 / self.total, "top5": self.correct5 / self.total,
                "mean_per_class_top1": sum(r["top1"] for r in per_class) / len(per_class)}


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, paths: list[Path], labels: list[int], classnames: list[str],
                      templates: list[str], batch_size: int = 64, workers: int = 0,
                      method: ZeroShotMethod = "contrastive") -> dict:
    """Top-1, top-5 and per-class accuracy, with each image's top-5 predictions.

    ``method``: ``contrastive`` (CLIP-style: nearest class embedding), ``likelihood`` (CoCa's
    generative zero-shot: the class whose prompts the decoder finds most likely for the image; one
    decoder pass per image x prompt, so keep the templates few) or ``both``: each of the two, plus
    their ensemble (the mean of the two class distributions), which is the headline result."""
    if method not in METHODS:
        raise UserError(f"zero-shot method must be one of {METHODS}, got {method!r}")
    model.eval()
    use_contrastive, use_likelihood = method in ("contrastive", "both"), method in ("likelihood", "both")
    classifier = class_embeddings(model, tokenizer, classnames, templates) if use_contrastive else None
    prompts = prompt_tokens(tokenizer, classnames, templates) if use_likelihood else None
    scale = model.contrastive_scale()
    primary = "ensemble" if method == "both" else method
    tallies = {name: _Tally(len(classnames)) for name in
               (("contrastive", "likelihood", "ensemble") if method == "both" else (method,))}
    skipped, predictions = [], []
    for idx, images in image_batches(paths, model.cfg.vision.image_size, batch_size, workers, skipped, "zero-shot"):
        images = to_model(model, images)
        probs = {}
        if use_contrastive:
            probs["contrastive"] = (scale * zero_shot_logits(model, images, classifier)).float().softmax(-1)
        if use_likelihood:
            probs["likelihood"] = likelihood_logits(model, images, prompts, len(classnames), batch_size).softmax(-1)
        if method == "both":
            probs["ensemble"] = (probs["contrastive"] + probs["likelihood"]) / 2
        truth = [labels[i] for i in idx]
        tops = {name: tally.add(probs[name], truth) for name, tally in tallies.items()}
        top_p, top_i = tops[primary]
        for i, t, ps, cs in zip(idx, truth, top_p, top_i):
            predictions.append({"image": str(paths[i]), "label": t, "label_name": classnames[t],
                                "top5": [{"class": c, "name": classnames[c], "prob": round(p, 6)}
                                         for c, p in zip(cs, ps)]})
    n = len(predictions)
    if n == 0:
        raise UserError(f"none of the {len(paths)} images could be read ({skip_counts(skipped)})")
    metrics = {**tallies[primary].metrics(classnames), "n_images": n, "n_classes": len(classnames),
               "n_templates": len(templates), "chance_top1": 1 / len(classnames)}
    if method == "both":
        for name in ("contrastive", "likelihood"):
            metrics.update({f"{name}_{k}": v for k, v in tallies[name].metrics(classnames).items()})
    return {
        "metrics": metrics, "method": method,
        "skipped": skip_counts(skipped), "skipped_files": skipped,
        "per_class": tallies[primary].per_class(classnames), "predictions": predictions,
    }


@torch.no_grad()
def rank_labels(model, tokenizer, images: torch.Tensor, labels: list[str], templates: list[str] | None = None,
                method: ZeroShotMethod = "contrastive"):
    """[B, L] probabilities of each label: softmax over the model's temperature-scaled cosines
    (contrastive), over the prompts' log-likelihoods (likelihood), or the mean of the two (both)."""
    if method not in METHODS:
        raise UserError(f"method must be one of {METHODS}, got {method!r}")
    templates = templates or ["{}"]
    images = to_model(model, images)
    probs = []
    if method in ("contrastive", "both"):
        classifier = class_embeddings(model, tokenizer, labels, templates)
        probs.append((model.contrastive_scale() * zero_shot_logits(model, images, classifier)).float().softmax(-1))
    if method in ("likelihood", "both"):
        prompts = prompt_tokens(tokenizer, labels, templates)
        probs.append(likelihood_logits(model, images, prompts, len(labels)).softmax(-1))
    return sum(probs) / len(probs)
