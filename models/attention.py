"""Causal self-attention backends: one function per backend, all with the same signature.

Each backend maps q (B, nh, T, hs), k and v (B, nkv, T, hs) to y (B, nh, T, hs), where nh is a
multiple of nkv and query head h reads KV head h // (nh // nkv) (grouped-query attention).
Adding a backend is one entry in ``ATTENTION_BACKENDS``; ``GPTConfig`` validates against it.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(hs)) v with a causal mask; the readable reference.

    q (B, nh, T, hs), k/v (B, nkv, T, hs) -> (B, nh, T, hs).
    """
    T, hs = q.size(-2), q.size(-1)
    group = q.size(1) // k.size(1)
    if group > 1:
        # Each KV head serves `group` consecutive query heads.
        k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
        v = v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hs)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

    q (B, nh, T, hs), k/v (B, nkv, T, hs) -> (B, nh, T, hs).
    """
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=q.size(1) != k.size(1)
    )


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "math": math_attention,
    "sdpa": sdpa_attention,
}
