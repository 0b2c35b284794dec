"""Image-text retrieval: image-to-text and text-to-image recall@K on normalised embeddings.

Each image may have several captions (COCO/Flickr have five). Image-to-text counts a hit when any
of the image's captions is among the top K texts; text-to-image when the caption's image is among
the top K images (the standard protocol of CLIP, ALIGN and CoCa).
"""

from __future__ import annotations

import os

import torch

from ..data.annotations import resolve_image_root
from ..errors import UserError
from ..loading import to_model
from .common import image_batches, skip_counts

KS = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks=KS) -> dict:
    """``similarity`` [N_images, N_texts]; ``text_to_image[j]`` is the image of text j.

    Returns metrics (i2t_R@k, t2i_R@k, their mean) and each query's rank of its best match (0 = first).
    """
    n_images, n_texts = similarity.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have {n_texts} entries, got {tuple(text_to_image.shape)}")
    positive = torch.zeros_like(similarity, dtype=torch.bool)
    positive[text_to_image, torch.arange(n_texts)] = True
    # rank of an item = how many others score strictly higher than it
    best_pos = similarity.masked_fill(~positive, float("-inf")).max(1).values
    i2t_rank = (similarity > best_pos[:, None]).sum(1)
    own = similarity[text_to_image, torch.arange(n_texts)]
    t2i_rank = (similarity > own[None, :]).sum(0)
    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        metrics[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return {"metrics": metrics, "i2t_rank": i2t_rank.tolist(), "t2i_rank": t2i_rank.tolist()}


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, items: list[dict], images_root: str | os.PathLike, batch_size: int = 64,
                       workers: int = 0) -> dict:
    """``items`` as from ``load_caption_annotations``. Unreadable images are skipped (with their captions)."""
    model.eval()
    device = next(model.parameters()).device
    root = resolve_image_root([it["file_name"] for it in items], images_root)
    paths = [root.path / it["file_name"] for it in items]
    skipped: list[dict] = []
    kept, image_embeds = [], []
    for idx, images in image_batches(paths, model.cfg.vision.image_size, batch_size, workers, skipped, "images"):
        kept.extend(idx)
        image_embeds.append(model.encode_image(to_model(model, images)).float().cpu())
    if not kept:
        raise UserError(f"none of the {len(paths)} images could be read ({skip_counts(skipped)})")
    texts, owner = [], []
    for row, i in enumerate(kept):
        texts.extend(items[i]["captions"])
        owner.extend([row] * len(items[i]["captions"]))
    text_embeds = torch.cat([model.encode_text(tokenizer.encode(texts[s:s + batch_size]).to(device)).float().cpu()
                             for s in range(0, len(texts), batch_size)])
    sim = torch.cat(image_embeds) @ text_embeds.T
    result = recall_at_k(sim, torch.tensor(owner))
    result["metrics"].update({"n_images": len(kept), "n_texts": len(texts),
                              "chance_R@1": 1 / len(kept)})
    top_text = sim.argmax(1).tolist()
    top_image = sim.argmax(0).tolist()
    predictions = {
        "image_to_text": [{"image_id": items[i]["id"], "file_name": items[i]["file_name"],
                           "rank_of_first_match": result["i2t_rank"][row], "top_text": texts[top_text[row]]}
                          for row, i in enumerate(kept)],
        "text_to_image": [{"text": texts[j], "image_id": items[kept[owner[j]]]["id"],
                           "rank_of_image": result["t2i_rank"][j], "top_image_id": items[kept[top_image[j]]]["id"]}
                          for j in range(len(texts))],
    }
    return {"metrics": result["metrics"], "image_root": root.note, "skipped": skip_counts(skipped),
            "skipped_files": skipped, "predictions": predictions}
