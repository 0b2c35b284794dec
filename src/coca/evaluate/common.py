"""What every evaluation shares: batched image encoding that skips (and counts) bad images,
text-list files, and the JSON result file (loading the model: ``coca.loading``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data.samples import MAX_PIXELS, Skipped, decode_image
from ..data.transforms import eval_transform
from ..errors import InputNotFound, UserError
from ..io import atomic_write_text


class ImageFiles(torch.utils.data.Dataset):
    """Paths -> (position, eval-transformed image) or (position, Skipped) for a bad file."""

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: int, max_pixels: int = MAX_PIXELS):
        self.paths = [Path(p) for p in paths]
        self.transform = eval_transform(image_size)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            data = path.read_bytes()
        except OSError:
            return i, Skipped("missing_image", str(path))
        image = decode_image(data, self.max_pixels, str(path))
        if isinstance(image, Skipped):
            return i, image
        try:
            return i, self.transform(image)
        except (OSError, ValueError, RuntimeError):  # decodes but cannot be resized: this file only
            return i, Skipped("decode_error", str(path))


def _collate(items):
    return items


def image_batches(paths: Sequence[str | os.PathLike], image_size: int, batch_size: int = 64, workers: int = 0,
                  skipped: list | None = None, desc: str = "images") -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (positions, [B, 3, S, S]) over ``paths`` in order; bad images go to ``skipped`` as
    {"path", "reason"} and are left out of the batches (with a progress bar on stderr)."""
    from ..progress import progress_bar
    loader = torch.utils.data.DataLoader(ImageFiles(paths, image_size), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    with progress_bar(len(paths), desc=desc, unit="img", leave=False) as bar:
        for items in loader:
            good = [(i, x) for i, x in items if not isinstance(x, Skipped)]
            if skipped is not None:
                skipped.extend({"path": x.key, "reason": x.reason} for _, x in items if isinstance(x, Skipped))
            bar.update(len(items))
            if good:
                yield [i for i, _ in good], torch.stack([x for _, x in good])


def skip_counts(skipped: list[dict]) -> dict[str, int]:
    return dict(Counter(s["reason"] for s in skipped))


def read_text_list(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (surrounding whitespace stripped); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{what} file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {path} is not UTF-8 text: {e}") from None
    items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise UserError(f"{what} file {path} is empty: it needs one entry per line")
    return items


def write_results(path: str | os.PathLike, results: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return path


def print_table(title: str, rows: Sequence[tuple[str, object]], log=print) -> None:
    width = max(len(name) for name, _ in rows)
    log(title)
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        log(f"  {name:<{width}}  {shown}")
