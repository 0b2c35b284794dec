"""One evaluation as a `coca eval` command runs it and as training runs it every ``train.eval_every``
steps: the same ``EvalConfig``, the same inputs, the same code, so the numbers are equal.

``Evaluation(cfg)`` reads the inputs once (annotations, class names, templates, the image list)
and fails at once on a bad file, before a long training run starts; ``run(model, tokenizer)``
can then be called at every evaluation step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EvalConfig


@dataclass
class EvalResult:
    name: str                                   # the eval's name (metric prefix)
    task: str
    metrics: dict[str, float]                   # numeric metrics (top1, CIDEr, i2t_R@1, n_images, ...)
    details: dict                               # everything `coca eval` writes to its JSON file
    rows: list[tuple[str, object]] = field(default_factory=list)  # the printed table

    def prefixed(self) -> dict[str, float]:
        """``{"<name>.<metric>": value}`` as written to metrics.jsonl and TensorBoard."""
        return {f"{self.name}.{k}": v for k, v in self.metrics.items()}


class Evaluation:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.compiled = None  # caption with compile: the CompiledDecoder every run decodes with
        if cfg.task == "zeroshot":
            from .zeroshot import (
                IMAGENET_CLASSNAMES,
                IMAGENET_TEMPLATES,
                labelled_images,
                load_classnames,
                load_templates,
            )
            names_file = cfg.classnames or (IMAGENET_CLASSNAMES if cfg.dataset == "imagenet" else None)
            classnames = load_classnames(names_file) if names_file else None
            self.templates = load_templates(cfg.templates or IMAGENET_TEMPLATES)
            self.labelled = labelled_images(cfg.images, cfg.labels_file or None, classnames)
        else:
            from ..data.annotations import load_caption_annotations, resolve_image_root
            self.items = load_caption_annotations(cfg.annotations, cfg.split)[:cfg.limit or None]
            resolve_image_root([it["file_name"] for it in self.items], cfg.images)  # fail now, not after training

    def run(self, model, tokenizer) -> EvalResult:
        cfg = self.cfg
        if cfg.task == "zeroshot":
            from .zeroshot import evaluate_zeroshot
            li = self.labelled
            out = evaluate_zeroshot(model, tokenizer, li.paths, li.labels, li.classnames, self.templates,
                                    batch_size=cfg.batch_size, workers=cfg.workers, method=cfg.method)
            out["class_mapping"] = li.mapping
            m = out["metrics"]
            label = {"contrastive": "", "likelihood": " (likelihood)", "both": " (ensemble)"}[cfg.method]
            rows = [(f"top-1{label}", m["top1"]), (f"top-5{label}", m["top5"]),
                    (f"mean per-class top-1{label}", m["mean_per_class_top1"])]
            if cfg.method == "both":
                rows += [(f"top-1 ({name})", m[f"{name}_top1"]) for name in ("contrastive", "likelihood")]
            rows += [("images", m["n_images"]), ("classes", m["n_classes"]), ("templates", m["n_templates"]),
                     ("chance top-1", m["chance_top1"]), ("class mapping", li.mapping)]
        elif cfg.task == "caption":
            from ..generation import GenerationConfig
            from .captioning import METRICS, evaluate_captions
            config = GenerationConfig(strategy=cfg.strategy, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                      compile=cfg.compile)
            out = evaluate_captions(model, tokenizer, self.items, cfg.images, batch_size=cfg.batch_size,
                                    workers=cfg.workers, spice=cfg.spice, config=config,
                                    compiled=self.compiled_decoder(model) if cfg.compile else None)
            m = out["metrics"]
            rows = [(name, m[name]) for name in METRICS if name in m]
            rows += [("exact match", m["exact_match"]), ("images", m["n_images"]), ("tokenizer", out["tokenizer"])]
        else:
            from .retrieval import evaluate_retrieval
            out = evaluate_retrieval(model, tokenizer, self.items, cfg.images, batch_size=cfg.batch_size,
                                     workers=cfg.workers)
            rows = list(out["metrics"].items())
        metrics = {k: float(v) for k, v in out["metrics"].items() if isinstance(v, (int, float))}
        return EvalResult(cfg.name, cfg.task, metrics, out, rows)

    def compiled_decoder(self, model):
        """This evaluation's ``CompiledDecoder`` of ``model``, kept from run to run: a training run
        that evaluates every N steps recompiles only it, when the weights have changed."""
        from ..compiled_decoding import CompiledDecoder
        if self.compiled is None or self.compiled.decoder is not model.text_decoder:
            self.compiled = CompiledDecoder(model)
        return self.compiled
