"""The reference GPT (GPT-2 family), importable as ``parallax.models``.

    from parallax.models import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("tiny"))
    loss = model(x, y)
"""

from .attention import ATTENTION_BACKENDS
from .config import PRESETS, GPTConfig
from .gpt import GPT, MLP, Block, CausalSelfAttention

__all__ = ["GPT", "GPTConfig", "PRESETS", "ATTENTION_BACKENDS", "Block", "CausalSelfAttention", "MLP"]
