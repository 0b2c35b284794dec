"""Captioning a collection of image files into a resumable JSON-lines file (``coca caption --out``).

Inputs: image files, folders (searched recursively), glob patterns, and text files listing one
image path per line. Images are decoded in worker processes and captioned in batches; every
batch's lines are appended, flushed and fsynced before the next batch starts, so after a crash
or SIGKILL the file holds whole batches plus at most one torn last line. A rerun with the same
``--out`` drops a torn last line, skips every path already in the file and appends the rest:
no line is lost and none is written twice. Unreadable images are skipped and counted by reason
(they are not written, so a rerun retries them).
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data.readers import IMAGE_EXTENSIONS
from .errors import InputNotFound, UserError

IMAGE_SUFFIXES = set(IMAGE_EXTENSIONS)
LIST_SUFFIXES = {".txt", ".lst", ".list"}


def collect_image_paths(inputs: list[str]) -> list[str]:
    """Expand inputs into image paths, in order, each once. A folder gives its images sorted
    (recursively); a glob its sorted matches; a .txt/.lst file one path per line (blank lines and
    lines starting with '#' ignored; relative paths are taken from the current directory)."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise UserError(f"folder {item!r} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise UserError(f"list file {item!r} names no images")
            paths += listed
        elif p.is_file():
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item, recursive=True)
                           if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file())
            if not found:
                raise UserError(f"pattern {item!r} matches no images")
            paths += found
        else:
            raise InputNotFound(f"{item!r} is not an image file, folder, glob pattern or list file")
    seen: set[str] = set()
    return [x for x in paths if not (x in seen or seen.add(x))]


def read_done(out: Path) -> set[str]:
    """Paths already captioned in ``out``. Every record is written with its newline, so only a
    last line without one can be a write cut short: it is cut off the file. Any other line that
    is not a caption record means ``out`` is not a file this command wrote: refused, untouched."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete, _, torn = data.rpartition(b"\n")
    done = set()
    for n, line in enumerate(complete.split(b"\n") if complete else [], 1):
        try:
            record = json.loads(line)
            done.add(record["path"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{out}: line {n} is not a caption record; --out must be a file this command "
                            "wrote (or a new path)") from None
    if torn:
        with open(out, "r+b") as f:
            f.truncate(len(data) - len(torn))
            f.flush()
            os.fsync(f.fileno())
    return done


@dataclass
class CaptionRun:
    total: int = 0            # images named by the inputs
    already_done: int = 0     # found in --out from an earlier run
    captioned: int = 0        # captioned now
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def caption_files(model, paths: list[str], out: Path | None, emit=print, batch_size: int = 16, workers: int = 2,
                  with_score: bool = False, config=None, prefix=None, compiled=None, **options) -> CaptionRun:
    """Caption ``paths`` as ``config`` (a ``GenerationConfig``; keyword ``options`` build or amend
    it) says; with ``out`` append JSON lines (``path``, ``caption``[, ``score``]) there, else
    ``emit`` "path<TAB>caption" lines. ``score`` is the caption's mean log-probability per token.
    With ``num_return_sequences`` > 1 a record has ``captions`` (and ``scores``) lists instead.
    With ``compile`` every batch decodes through one ``CompiledDecoder`` (``compiled``, or one
    of this run's own)."""
    from .evaluate.common import image_batches, skip_counts
    from .loading import to_model
    from .generation import GenerationConfig, compiled_decoder
    config = GenerationConfig.of(config, **options)
    run = CaptionRun(total=len(paths))
    done = read_done(out) if out is not None else set()
    todo = [p for p in paths if p not in done]
    run.already_done = len(paths) - len(todo)
    n_return = config.num_return_sequences
    skipped: list[dict] = []
    t0 = time.perf_counter()
    sink = open(out, "a", encoding="utf-8") if out is not None else None
    try:
        with compiled_decoder(model, config, compiled) as compiled:
            for idx, images in image_batches(todo, model.cfg.vision.image_size, batch_size, workers, skipped, "caption"):
                result = model.generate(to_model(model, images), config, prefix=prefix, return_dict=True,
                                        compiled=compiled)
                texts = model.tokenizer.decode(result.tokens)
                scores = result.normalized_scores.tolist()
                lines = []
                for j, i in enumerate(idx):
                    mine = slice(j * n_return, (j + 1) * n_return)
                    if n_return == 1:
                        record = {"path": todo[i], "caption": texts[j]}
                        if with_score:
                            record["score"] = round(scores[j], 5)
                    else:
                        record = {"path": todo[i], "captions": texts[mine]}
                        if with_score:
                            record["scores"] = [round(s, 5) for s in scores[mine]]
                    lines.append(record)
                if sink is not None:
                    sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
                    sink.flush()
                    os.fsync(sink.fileno())
                else:
                    for r in lines:
                        emit(f"{r['path']}\t{r['caption'] if n_return == 1 else ' | '.join(r['captions'])}")
                run.captioned += len(lines)
    finally:
        if sink is not None:
            sink.close()
        run.seconds = time.perf_counter() - t0
        run.skipped = skip_counts(skipped)
    return run
