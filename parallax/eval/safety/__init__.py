"""Security evaluation: refusal and over-refusal on held-out prompts (data in ``data/``), judged
by the transparent rule-based classifier ``is_refusal``."""

from .refusal import is_refusal

__all__ = ["is_refusal"]
