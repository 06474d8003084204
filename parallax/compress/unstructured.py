"""Unstructured pruning: zero the lowest-scoring weights of each target linear, in place.

Scores: magnitude |W|, or Wanda's |W_ij| * ||X_j||_2 (Sun et al. 2023), X_j the j-th input feature
over every calibration token. Comparison groups (each prunes exactly round(sparsity * size) of its
weights, ties broken by position, lower flat index pruned first):

- magnitude, scope="layer": each layer's whole matrix;
- wanda, scope="layer": each output row of each layer (the paper's per-output comparison);
- scope="global" (either score): every target weight of the model at once, one threshold for all
  layers (for Wanda this compares activation-weighted scores across layers; the paper found the
  per-output group better, so "layer" is the default).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def prune_count(sparsity: float, size: int) -> int:
    """How many of ``size`` weights a ``sparsity`` fraction prunes: the nearest integer (halves up)."""
    return math.floor(sparsity * size + 0.5)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (R, M), True at the ``k`` lowest scores of each row of ``scores`` (R, M); among
    equal scores at the threshold the lower column indices are taken first (deterministic)."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=-1, keepdim=True).values  # (R, 1)
    below = scores < threshold
    at = scores == threshold
    still_needed = k - below.sum(dim=-1, keepdim=True)
    return below | (at & (at.cumsum(dim=-1) <= still_needed))


def weight_scores(linear: nn.Linear, input_sq_norm: torch.Tensor | None) -> torch.Tensor:
    """(out, in) float32 scores: |W|, times ||X_j||_2 per input column when ``input_sq_norm``
    (in,) (the sum of x_j ** 2 over the calibration tokens) is given (Wanda)."""
    scores = linear.weight.detach().float().abs()
    return scores if input_sq_norm is None else scores * input_sq_norm.sqrt()[None, :]


@torch.no_grad()
def prune_unstructured(linears: dict[str, nn.Linear], sparsity: float, scores: dict[str, torch.Tensor], *,
                       scope: str, per_row: bool) -> None:
    """Zero, in place, the lowest-scoring ``sparsity`` fraction of the target weights (see the
    module docstring for the groups). ``scores``: {fqn: (out, in)} as ``weight_scores`` gives."""
    if scope == "global":
        flat = torch.cat([scores[fqn].reshape(-1).cpu() for fqn in linears])[None]  # (1, total)
        masks = lowest_k_mask(flat, prune_count(sparsity, flat.numel()))[0].split(
            [m.weight.numel() for m in linears.values()])
        for (fqn, linear), mask in zip(linears.items(), masks):
            linear.weight.masked_fill_(mask.view_as(linear.weight).to(linear.weight.device), 0)
        return
    for fqn, linear in linears.items():
        score = scores[fqn]
        grouped = score if per_row else score.reshape(1, -1)
        mask = lowest_k_mask(grouped, prune_count(sparsity, grouped.shape[1]))
        linear.weight.masked_fill_(mask.view_as(linear.weight), 0)
