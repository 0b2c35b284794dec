"""Caption annotation files (COCO captions, Karpathy's dataset_coco.json, a list of pairs) and
where their images are: what captioning evaluation, retrieval and ``data.kind: coco`` share."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputNotFound, UserError


def load_caption_annotations(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Images with their reference captions: [{"id", "file_name", "captions": [str, ...]}].

    Accepts
    - COCO format: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]};
    - Karpathy's dataset_coco.json: {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]},
      filtered to ``split`` (default "test"; several joined by "+", e.g. "train+restval");
    - a list of {"image": path, "caption": str or [str]} (the common Karpathy-split JSON layout).
    Images without any caption are left out; a file that matches none of these is an error
    naming what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"annotation file {str(path)!r} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    try:
        if isinstance(data, list):
            items = _from_list(data)
        elif isinstance(data, dict) and "annotations" in data:
            items = _from_coco(data)
        elif isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
            items = _from_karpathy(data, split or "test")
        else:
            raise UserError("expected a COCO captions file ({'images': [...], 'annotations': [...]}), "
                             "Karpathy's dataset_coco.json, or a list of {'image', 'caption'} entries")
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: malformed annotation entry ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    items = [it for it in items if it["captions"]]
    if not items:
        raise UserError(f"{path}: no images with captions" + (f" in split {split!r}" if split else ""))
    return items


def _caption_text(c, where: str) -> str:
    if not isinstance(c, str):
        raise UserError(f"{where}: caption must be a string, got {type(c).__name__}")
    return " ".join(c.split())


def _from_coco(data: dict) -> list[dict]:
    if not isinstance(data.get("images"), list) or not isinstance(data["annotations"], list):
        raise UserError("'images' and 'annotations' must both be lists")
    items, by_id = [], {}
    for im in data["images"]:
        item = {"id": im["id"], "file_name": im["file_name"], "captions": []}
        if item["id"] in by_id:
            raise UserError(f"image id {item['id']!r} appears twice in 'images'")
        by_id[item["id"]] = item
        items.append(item)
    for n, ann in enumerate(data["annotations"]):
        image_id = ann["image_id"]
        if image_id not in by_id:
            raise UserError(f"annotation {n} refers to image_id {image_id!r}, which is not in 'images'")
        text = _caption_text(ann["caption"], f"annotation {n}")
        if text:
            by_id[image_id]["captions"].append(text)
    return items


def _from_karpathy(data: dict, split: str) -> list[dict]:
    wanted = {s.strip() for s in split.split("+") if s.strip()}
    present = {im.get("split") for im in data["images"]}
    if not wanted & present:
        raise UserError(f"no images in split {split!r}; the file has splits {sorted(map(str, present))}")
    items = []
    for n, im in enumerate(data["images"]):
        if im.get("split") not in wanted:
            continue
        name = os.path.join(im.get("filepath", ""), im["filename"])
        caps = [_caption_text(s["raw"], f"image {n}") for s in im["sentences"]]
        items.append({"id": im.get("cocoid", im.get("imgid", n)), "file_name": name, "captions": [c for c in caps if c]})
    return items


def _from_list(data: list) -> list[dict]:
    items, by_name = [], {}
    for n, entry in enumerate(data):
        caps = entry["caption"]
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list):
            raise UserError(f"entry {n}: 'caption' must be a string or a list of strings")
        name = entry["image"]
        if name not in by_name:
            by_name[name] = {"id": entry.get("image_id", len(items)), "file_name": name, "captions": []}
            items.append(by_name[name])
        by_name[name]["captions"].extend(t for t in (_caption_text(c, f"entry {n}") for c in caps) if t)
    return items


@dataclass(frozen=True)
class ImageRoot:
    """The folder an annotation file's relative image paths were found under, and how."""

    path: Path
    found: int       # images that exist under ``path``
    total: int
    note: str        # one line for the log and the result JSON


def resolve_image_root(file_names: list[str], images: str | os.PathLike) -> ImageRoot:
    """Resolve relative image paths against ``images`` or, failing that, its parent.

    Karpathy's dataset_coco.json names images ``val2014/COCO_val2014_...jpg``; a user naturally
    passes ``--images coco/val2014``, whose parent is the folder those paths are relative to. The
    folder under which more of the images exist wins (``images`` itself on a tie).
    """
    root = Path(images)
    if not root.is_dir():
        raise InputNotFound(f"image directory {str(root)!r} not found")
    total = len(file_names)
    found = sum((root / f).is_file() for f in file_names)
    if found == total or root.parent == root:
        best = ImageRoot(root, found, total, f"image paths resolved against {root} ({found} of {total} found)")
    else:
        parent = root.parent
        found_parent = sum((parent / f).is_file() for f in file_names)
        if found_parent > found:
            best = ImageRoot(parent, found_parent, total,
                             f"image paths resolved against {parent}, the parent of {root} ({found_parent} of "
                             f"{total} found; the annotation paths already start with a folder name)")
        else:
            best = ImageRoot(root, found, total, f"image paths resolved against {root} ({found} of {total} found)")
    if best.found == 0 and total:
        raise InputNotFound(f"none of the {total} images named in the annotations exist under {root} or its "
                                f"parent (first: {file_names[0]!r})")
    return best
