"""Batched multi-LoRA: each token's low-rank update through its own adapter, in one call
(Punica's SGMV, "segmented gather matrix-vector"), so one batch mixes requests for different
adapters and the base model without merging any adapter into the weights.

    delta[t] = scaling[i] * (x[t] @ lora_a[i].T) @ lora_b[i].T    with i = indices[t]
    delta[t] = 0                                                  where indices[t] < 0 (the base model)

Shapes: T tokens, K input features, N output features, S adapter slots, R rank (adapters of
lower rank are zero-padded to R: the padding adds nothing).

x (T, K); lora_a (S, R, K); lora_b (S, N, R); indices (T,) int64 in [-1, S); scaling (S,) float32.
Returns delta (T, N) in lora_a's dtype (float32 accumulation).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["sgmv", "sgmv_ref"]


def sgmv_ref(x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor) -> Tensor:
    """Plain PyTorch: the tokens of each adapter present gathered, two matmuls, scattered back."""
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        h = x.index_select(0, rows).to(lora_a.dtype)
        out.index_copy_(0, rows, (h @ lora_a[slot].T) @ lora_b[slot].T * scaling[slot].to(lora_a.dtype))
    return out


def sgmv(x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor, *,
         backend: str | None = None) -> Tensor:
    """``sgmv_ref``'s result; the Triton kernel on CUDA (helper B1 adds it and the checks)."""
    return sgmv_ref(x, lora_a, lora_b, indices, scaling)
