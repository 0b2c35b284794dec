"""Model code: single-device, readable top to bottom. Parallelism is applied from ``coca.train``
(its engines wrap the model; its loss gathers embeddings across ranks)."""

from .coca import CoCa, create_model, load
from .t5 import T5Decoder, T5Encoder
from .vit import AttentionalPooler, VisionTransformer

__all__ = ["CoCa", "create_model", "load", "T5Encoder", "T5Decoder", "VisionTransformer", "AttentionalPooler"]
