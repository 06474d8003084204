"""``sequence_logps``: each sequence's log-probability of its targets, from hidden states, computed
chunk-wise by ``px.ops.linear_cross_entropy`` so that the (tokens, vocabulary) logits never exist."""

from __future__ import annotations

import torch

from parallax.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["sequence_logps"]


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   ignore_index: int = -100, average: bool = False) -> torch.Tensor:
    """(B,) sum (or with ``average`` the mean) over t of log p(targets[b, t] | hidden[b, t]) for the
    targets that are not ``ignore_index``.

    hidden (B, T, C) final hidden states, weight (V, C) the LM head, targets (B, T) int64 (shifted:
    target t follows input t). A row without targets gives 0 (sum) or NaN (average).
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, C) and targets (B, T); got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    B, T, C = hidden.shape
    # the chunked PyTorch path on the CPU, as the models' loss (the Triton interpreter, which tests
    # enable, is for checking kernels, not for scoring thousands of sequences)
    nll = linear_cross_entropy(hidden.reshape(B * T, C), weight, targets.reshape(B * T), ignore_index=ignore_index,
                               reduction="none", backend=None if hidden.is_cuda else "chunked").view(B, T)
    total = -nll.float().sum(dim=1)
    return total / (targets != ignore_index).sum(dim=1) if average else total
