"""Evaluation: zero-shot classification, captioning metrics, and the synthetic held-out suite."""
