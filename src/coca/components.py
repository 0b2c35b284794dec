"""The model's components, defined once: the names ``optim.freeze`` and ``optim.lr_mult`` take,
their label in ``coca info``, and their parameter-name prefixes. Imports nothing, so the config
(which validates those names) and the model code can both use it."""

from __future__ import annotations

# Components: the names `optim.freeze` and `optim.lr_mult` take, their label in `coca info`, and
# their parameter-name prefixes. They are disjoint: the shared token embedding and the LM head are
# components of their own, not part of the text encoder / decoder.
COMPONENTS = {
    "visual": ("vision tower (ViT)", ("visual.",)),
    "poolers": ("attentional poolers", ("gen_pooler.", "contrastive_pooler.", "ln_visual.")),
    "text_encoder": ("text encoder (T5)", ("text_encoder.",)),
    "text_decoder": ("text decoder (T5)", ("text_decoder.",)),
    "token_embedding": ("token embedding (shared)", ("text_encoder.embed_tokens.",)),
    "lm_head": ("LM head (untied)", ("text_decoder.lm_head.",)),
    "projections": ("contrastive projections", ("image_proj.", "text_proj.")),
    "temperature": ("temperature", ("logit_scale",)),
}
VISUAL_COMPONENTS = ("visual", "poolers")
# what the components are in the open_clip family (coca.models.open_clip_coca), where they differ
OPEN_CLIP_LABELS = {
    "poolers": "attentional pooler",
    "text_encoder": "text tower (CLIP, causal)",
    "text_decoder": "multimodal decoder",
    "token_embedding": "token embedding",
    "lm_head": "LM head",
}


def component_label(component: str, family: str = "t5") -> str:
    """A component's label in ``coca info`` for a model family."""
    if component not in COMPONENTS:
        return ""
    return OPEN_CLIP_LABELS.get(component, COMPONENTS[component][0]) if family == "open_clip" else COMPONENTS[component][0]


def component_of(name: str) -> str:
    """The component a parameter belongs to (the most specific prefix wins: the embedding and
    the LM head sit inside the text modules)."""
    best, best_len = None, -1
    for comp, (_, prefixes) in COMPONENTS.items():
        for p in prefixes:
            if name.startswith(p) and len(p) > best_len:
                best, best_len = comp, len(p)
    if best is None:
        raise KeyError(f"parameter {name!r} belongs to no component")
    return best
