"""Training: the loop, optimiser and schedule, checkpoints. Parallelism will live in ``distributed.py``."""

from .loop import train

__all__ = ["train"]
