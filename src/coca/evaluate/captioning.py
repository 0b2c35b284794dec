"""Captioning metrics that need no external runtime: exact match and CIDEr (pycocoevalcap's scorer)."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w\s]")


def normalise(caption: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (what COCO's PTB tokeniser does for plain text)."""
    return " ".join(_PUNCT.sub(" ", caption.lower()).split())


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
