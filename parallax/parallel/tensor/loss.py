"""``lm_head_loss``: the language-model loss of final hidden states under an LM head, tensor
parallel or not. The tensor-parallel forward and the pipeline's last stage both call it."""

from __future__ import annotations

import torch
from torch import nn

from parallax.models.loss import lm_loss
from parallax.parallel.tensor.comm import gather_from_sequence
from parallax.parallel.tensor.cross_entropy import vocab_parallel_linear_cross_entropy
from parallax.parallel.tensor.layers import ColumnParallelLinear

__all__ = ["lm_head_loss"]


def lm_head_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy of hidden states h (B, T, C) under ``head``, or with
    ``reduction="none"`` each target's (B, T) fp32 (0 where ignored); negative targets are ignored.

    A ``ColumnParallelLinear`` head (vocabulary split over its group) gives the vocabulary-parallel
    fused loss, never forming full-vocabulary logits (under sequence parallelism h (B, T/tp, C) is
    all-gathered along the sequence first); any other head ``parallax.models.loss.lm_loss``.
    """
    if not isinstance(head, ColumnParallelLinear):
        return lm_loss(h, head.weight, targets, reduction)
    if head.bias is not None or head.conv1d:
        raise ValueError("lm_head_loss: a tensor-parallel LM head must be a bias-free nn.Linear-layout layer")
    if head.sequence_parallel:
        h = gather_from_sequence(h, head.group)
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"lm_head_loss: hidden states {tuple(h.shape)} do not match targets {tuple(targets.shape)}")
    flat = targets.reshape(-1)
    flat = flat.masked_fill(flat < 0, -100)
    loss = vocab_parallel_linear_cross_entropy(h.reshape(-1, h.size(-1)), head.weight, flat, head.group,
                                               ignore_index=-100, reduction=reduction,
                                               reduce_h_grad=not head.sequence_parallel, vocab_size=head.out_features)
    return loss if reduction == "mean" else loss.view(targets.shape)
