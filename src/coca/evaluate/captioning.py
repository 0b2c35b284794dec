"""Captioning evaluation: COCO-style metrics with pycocoevalcap, caption annotation files, and
generation over a folder of images.

The standard COCO protocol: candidates and references are tokenised with the PTB tokenizer
(Stanford CoreNLP, Java), then scored with BLEU-1..4, METEOR (Java), ROUGE-L, CIDEr and SPICE
(Java + Stanford CoreNLP models). A metric that cannot run here is reported as unavailable with
the reason, never dropped silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..data.annotations import load_caption_annotations, resolve_image_root  # noqa: F401 (re-exported)
from ..data.samples import normalise_caption as normalise
from ..errors import UserError
from ..loading import to_model
from .common import image_batches, skip_counts

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def exact_match(candidates: list[str], references: list[list[str]]) -> float:
    hits = sum(normalise(c) in {normalise(r) for r in refs} for c, refs in zip(candidates, references))
    return hits / max(1, len(candidates))


def cider(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr (Vedantam et al. 2015) with pycocoevalcap's reference implementation."""
    from pycocoevalcap.cider.cider import Cider
    gts = {i: [normalise(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [normalise(c) or "<empty>"] for i, c in enumerate(candidates)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# ------------------------------------------------------------------------------------ metrics

def java_missing() -> str | None:
    """Why Java-based scorers cannot run, or None when a Java runtime is on PATH."""
    return None if shutil.which("java") else "no Java runtime on PATH (install e.g. default-jre-headless)"


def spice_missing() -> str | None:
    reason = java_missing()
    if reason:
        return reason
    from pycocoevalcap.spice import get_stanford_models as models
    jar = Path(models.SPICEDIR) / models.SPICELIB / f"{models.JAR}.jar"
    if not jar.is_file():
        return (f"SPICE needs {jar.name} (Stanford CoreNLP) in {jar.parent}; fetch it once with "
                "`python -c 'from pycocoevalcap.spice.spice import Spice; Spice()'` on a machine with internet")
    return None


def tokenize(captions: dict) -> tuple[dict, str]:
    """{id: [str]} -> ({id: [tokenised str]}, tokenizer name). PTB (Java) when possible, else a
    Python approximation (lower-case, punctuation removed) that is reported as such."""
    if java_missing() is None:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb"
    return {k: [normalise(c) for c in v] for k, v in captions.items()}, "python (no Java: not the standard PTB)"


def coco_metrics(candidates: dict, references: dict, spice: bool = True) -> dict:
    """Score ``{id: caption}`` against ``{id: [reference, ...]}``.

    Returns {"metrics": {name: corpus score}, "unavailable": {name: reason}, "tokenizer": str,
    "per_item": {id: {name: score}}}.
    """
    if set(candidates) != set(references):
        raise ValueError("candidates and references must cover the same ids")
    if not candidates:
        raise ValueError("nothing to score: no candidates")
    ids = sorted(candidates, key=str)
    gts, tokenizer = tokenize({i: list(references[i]) for i in ids})
    res, _ = tokenize({i: [candidates[i]] for i in ids})
    metrics, unavailable, per_item = {}, {}, {i: {} for i in ids}

    def record(name, corpus, items):
        metrics[name] = float(corpus)
        for i, v in zip(ids, items):
            per_item[i][name] = float(v) if not isinstance(v, dict) else float(v["All"]["f"])

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    corpus, items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        record(f"BLEU-{n + 1}", corpus[n], items[n])
    java = java_missing()
    if java:
        unavailable["METEOR"] = java
    else:
        from pycocoevalcap.meteor.meteor import Meteor
        try:
            scorer = Meteor()
            try:
                corpus, items = scorer.compute_score(gts, res)
            finally:
                _close_meteor(scorer)
            record("METEOR", corpus, items)
        except Exception as e:  # a failing external scorer must not lose the other metrics
            unavailable["METEOR"] = f"METEOR failed: {type(e).__name__}: {e}"
    corpus, items = Rouge().compute_score(gts, res)
    record("ROUGE-L", corpus, items)
    corpus, items = Cider().compute_score(gts, res)
    record("CIDEr", corpus, items)
    reason = "disabled (--no-spice)" if not spice else spice_missing()
    if reason:
        unavailable["SPICE"] = reason
    else:
        from pycocoevalcap.spice.spice import Spice
        try:
            corpus, items = Spice().compute_score(gts, res)
            record("SPICE", corpus, items)
        except Exception as e:
            unavailable["SPICE"] = f"SPICE failed: {type(e).__name__}: {e}"
    return {"metrics": metrics, "unavailable": unavailable, "tokenizer": tokenizer, "per_item": per_item}


def _close_meteor(scorer) -> None:
    """pycocoevalcap's Meteor keeps a Java process; end it now rather than at interpreter exit."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def generate_captions(model, tokenizer, paths: list[Path], batch_size: int = 32, workers: int = 0,
                      skipped: list | None = None, config=None, compiled=None, **options) -> dict[int, str]:
    """{position in paths: generated caption} for every readable image, decoded as ``config`` (a
    ``GenerationConfig``; keyword ``options`` build or amend it) says. With ``compile`` every batch
    decodes through one ``CompiledDecoder``: ``compiled``, or one of this call's own."""
    from ..generation import GenerationConfig, compiled_decoder
    config = GenerationConfig.of(config, **options)
    model.eval()
    out = {}
    with compiled_decoder(model, config, compiled) as compiled:
        for idx, images in image_batches(paths, model.cfg.vision.image_size, batch_size, workers, skipped, "captioning"):
            texts = tokenizer.decode(model.generate(to_model(model, images), config, compiled=compiled))
            out.update(zip(idx, texts))
    return out


def evaluate_captions(model, tokenizer, items: list[dict], images_root: str | os.PathLike, batch_size: int = 32,
                      workers: int = 0, spice: bool = True, config=None, compiled=None, **options) -> dict:
    root = resolve_image_root([it["file_name"] for it in items], images_root)
    paths = [root.path / it["file_name"] for it in items]
    skipped: list[dict] = []
    generated = generate_captions(model, tokenizer, paths, batch_size, workers, skipped, config, compiled, **options)
    if not generated:
        raise UserError(f"none of the {len(paths)} images could be read ({skip_counts(skipped)})")
    keys = {i: str(items[i]["id"]) for i in generated}
    scores = coco_metrics({keys[i]: generated[i] for i in generated},
                          {keys[i]: items[i]["captions"] for i in generated}, spice=spice)
    scores["metrics"]["exact_match"] = exact_match([generated[i] for i in generated],
                                                   [items[i]["captions"] for i in generated])
    scores["metrics"]["n_images"] = len(generated)
    predictions = [{"image_id": items[i]["id"], "file_name": items[i]["file_name"], "caption": generated[i],
                    "references": items[i]["captions"], "scores": scores["per_item"][keys[i]]}
                   for i in sorted(generated)]
    return {"metrics": scores["metrics"], "unavailable": scores["unavailable"], "tokenizer": scores["tokenizer"],
            "image_root": root.note, "skipped": skip_counts(skipped), "skipped_files": skipped,
            "predictions": predictions}
