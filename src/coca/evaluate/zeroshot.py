"""Zero-shot classification as in CLIP: class embedding = mean of its normalised prompt
embeddings, renormalised; prediction = nearest class embedding to the image embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names: list[str], templates: list[str], batch_size: int = 256) -> torch.Tensor:
    """[C, E] normalised class embeddings."""
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
