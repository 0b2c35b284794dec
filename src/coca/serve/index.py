"""An image index for search by text or by image: normalised image embeddings plus a manifest.

``coca index DIR --model M --out INDEX`` writes into INDEX:

    meta.json            root folder, model directory, embedding size, dtype
    part-00000.npy ...   [n, E] float16 embeddings, one file per batch of images
    part-00000.jsonl     the paths of those rows (relative to the root), in order

A part's .npy is written first and its .jsonl last, each atomically, so a part counts only once
both exist: a rerun after a crash redoes the unfinished part and skips the images of finished
parts. Unreadable images are skipped and counted by reason.

Search is an exact inner product over all rows (cosine, the rows being normalised): about 2 ms
per 100,000 images of 512-d float16 on one core, so it stays interactive to a few million
images; beyond that an approximate index (FAISS IVF-PQ or HNSW) is the step up.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputNotFound, UserError
from ..io import atomic_write_bytes, atomic_write_text

META = "meta.json"
PROBE_MATCH = 0.98  # cosine between the probe embeddings of the same weights in fp32, bf16 or int8: > 0.99


@torch.no_grad()
def probe_embedding(model) -> list[float]:
    """The model's embedding of a fixed pseudo-random image: a fingerprint of its image tower, so an
    index is never extended or searched with another model (a different embedding space)."""
    from ..loading import to_model
    s = model.cfg.vision.image_size
    image = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(1234)) * 2 - 1
    return model.encode_image(to_model(model, image))[0].float().cpu().tolist()


def check_same_model(meta: dict, model, where: str) -> None:
    if int(meta["dim"]) != model.cfg.embed_dim:
        raise UserError(f"{where} holds {meta['dim']}-d embeddings but the model makes {model.cfg.embed_dim}-d ones: "
                        f"it was built with {meta.get('model') or 'another model'}")
    probe = torch.tensor(probe_embedding(model))
    cos = float(probe @ torch.tensor(meta["probe"]))
    if cos < PROBE_MATCH:
        raise UserError(f"{where} was built with a different model ({meta.get('model') or 'unknown'}; "
                        f"probe similarity {cos:.3f}): its embeddings cannot be searched or extended with this one")


@dataclass
class IndexRun:
    total: int = 0
    already_done: int = 0
    embedded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def _parts(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("part-*.jsonl"))


def build_index(model, image_dir: str | os.PathLike, out: str | os.PathLike, model_dir: str = "",
                batch_size: int = 64, workers: int = 2) -> IndexRun:
    from ..caption_files import collect_image_paths
    from ..evaluate.common import image_batches, skip_counts
    from ..loading import to_model
    root = Path(image_dir).resolve()
    if not root.is_dir():
        raise InputNotFound(f"image folder {str(image_dir)!r} not found")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["root"] != str(root):
            raise UserError(f"{out} indexes {meta['root']}, not {root}: use a new --out")
        check_same_model(meta, model, str(out))
    else:
        atomic_write_text(meta_path, json.dumps({"root": str(root), "model": str(model_dir),
                                                 "dim": model.cfg.embed_dim, "dtype": "float16",
                                                 "probe": probe_embedding(model)}) + "\n")
    paths = collect_image_paths([str(root)])
    done = set()
    for part in _parts(out):
        done.update(json.loads(line)["path"] for line in part.read_text().splitlines())
    todo = [p for p in paths if os.path.relpath(p, root) not in done]
    run = IndexRun(total=len(paths), already_done=len(paths) - len(todo))
    part_no = len(_parts(out))
    skipped: list[dict] = []
    with torch.no_grad():
        for idx, images in image_batches(todo, model.cfg.vision.image_size, batch_size, workers, skipped, "index"):
            embeds = model.encode_image(to_model(model, images)).float().cpu().numpy().astype(np.float16)
            stem = out / f"part-{part_no:05d}"
            buf = io.BytesIO()
            np.save(buf, embeds)
            atomic_write_bytes(stem.with_suffix(".npy"), buf.getvalue())
            atomic_write_text(stem.with_suffix(".jsonl"), "".join(
                json.dumps({"path": os.path.relpath(todo[i], root)}) + "\n" for i in idx))
            part_no += 1
            run.embedded += len(idx)
    run.skipped = skip_counts(skipped)
    return run


class ImageIndex:
    """A loaded index: ``search(query [E]) -> [(relative path, similarity)]``, ``resolve(path)``."""

    def __init__(self, index_dir: str | os.PathLike):
        d = Path(index_dir)
        if not (d / META).is_file():
            raise InputNotFound(f"{d} is not an index ({META} missing): build one with `coca index`")
        self.meta = json.loads((d / META).read_text())
        self.root = Path(self.meta["root"]).resolve()
        paths, arrays = [], []
        for part in _parts(d):
            npy = part.with_suffix(".npy")
            if not npy.exists():
                continue
            rows = [json.loads(line)["path"] for line in part.read_text().splitlines()]
            arr = np.load(npy, allow_pickle=False)
            if len(arr) != len(rows):
                raise UserError(f"{npy} has {len(arr)} rows but {part} lists {len(rows)} paths")
            paths += rows
            arrays.append(arr)
        self.paths = paths
        self.known = set(paths)
        dim = int(self.meta["dim"])
        self.embeddings = torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float16)).float()

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, query: torch.Tensor, k: int) -> list[tuple[str, float]]:
        if not len(self):
            return []
        scores = self.embeddings @ query.float().reshape(-1)
        top = scores.topk(min(k, len(self)))
        return [(self.paths[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def resolve(self, relative: str) -> Path:
        """The file of an indexed path; anything not in the manifest, or resolving outside the root
        (``../``, absolute paths, symlinks out), is refused."""
        if relative not in self.known:
            raise UserError(f"{relative!r} is not an image of this index")
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise UserError(f"{relative!r} resolves outside the index root")
        return path
