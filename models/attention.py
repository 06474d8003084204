"""Causal self-attention backends: one function per backend, all with the same signature.

Each backend maps q (B, nh, T, hs), k and v (B, nkv, T, hs) to y (B, nh, T, hs), where nh is a
multiple of nkv and query head h reads KV head h // (nh // nkv) (grouped-query attention).
Adding a backend is one entry in ``ATTENTION_BACKENDS``; ``GPTConfig`` validates against it.
"auto" (the default) is resolved on every call: "flash" for CUDA tensors (when parallax's Triton
kernel runs there and no attention dropout is asked for), "sdpa" otherwise; the Triton
interpreter that runs the kernel on CPU is for tests, not for CPU training.
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


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """parallax's Triton FlashAttention kernel (``parallax.ops.flash_attention``); no attention dropout.

    q (B, nh, T, hs), k/v (B, nkv, T, hs) -> (B, nh, T, hs). hs must be a multiple of 8 up to 256.
    """
    if dropout_p > 0.0:
        raise ValueError(f"the 'flash' attention backend has no attention dropout (dropout_p={dropout_p}); "
                         "use attention='sdpa' or 'math', or dropout=0.0")
    from parallax.ops.flash_attention import flash_attention as flash

    # the kernel takes (B, T, nh, hs): these transposes are views, read through their strides
    y = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # (B, T, nh, hs)
    return y.transpose(1, 2)  # (B, nh, T, hs)


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """"flash" for CUDA tensors when the Triton kernel runs there, takes this head size and no
    attention dropout is asked for; "sdpa" otherwise. Same shapes as the other backends."""
    if q.is_cuda and dropout_p == 0.0 and _flash_runs(q):
        return flash_attention(q, k, v)
    return sdpa_attention(q, k, v, dropout_p)


def _flash_runs(q: torch.Tensor) -> bool:
    from parallax.ops.flash_attention import SUPPORTED_HEAD_DIMS, backend

    return q.size(-1) in SUPPORTED_HEAD_DIMS and backend(q.device) == "triton"


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "math": math_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "auto": auto_attention,
}
