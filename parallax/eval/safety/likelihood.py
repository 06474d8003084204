"""Log-likelihoods of whole token sequences, batched, from the model's hidden states: the LM head
and the log-softmax run chunk-wise (``parallax.align.sequence_logps``), so the (tokens, vocabulary)
logits of a large batch of candidates never exist at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from parallax.align.logps import sequence_logps

__all__ = ["sequence_log_likelihoods"]

_IGNORE = -100


@torch.inference_mode()
def sequence_log_likelihoods(model: nn.Module, sequences: Sequence[Sequence[int]], starts: Sequence[int], *,
                             batch_size: int = 64) -> torch.Tensor:
    """(N,) float64: for each token sequence ``ids`` (L,) and its ``start`` (1 <= start <= L),
    the sum over t = start .. L-1 of log p(ids[t] | ids[:t]).

    ``model`` is a parallax model (``hidden_states`` and ``lm_head``); sequences are right-padded
    per batch of ``batch_size``, longest first, one forward per batch. A sequence longer than the
    model's ``block_size`` + 1 is scored in disjoint windows, each token with the longest context
    that fits (lm-eval's ``loglikelihood_rolling``).
    """
    if len(sequences) != len(starts):
        raise ValueError(f"sequences and starts must have the same length; got {len(sequences)} and {len(starts)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    block_size = model.config.block_size
    windows, starts_w, owner = [], [], []
    for i, (ids, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start <= len(ids):
            raise ValueError(f"sequence {i}: start must be in [1, {len(ids)}] (its length); got {start}")
        for window, window_start in _windows(ids, start, block_size):
            windows.append(window)
            starts_w.append(window_start)
            owner.append(i)
    totals = _score(model, windows, starts_w, batch_size)
    return torch.zeros(len(sequences), dtype=torch.float64).index_add_(0, torch.tensor(owner, dtype=torch.long),
                                                                       totals)


def _windows(ids: Sequence[int], start: int, block_size: int) -> list[tuple[Sequence[int], int]]:
    """(window, start in it) pairs whose scored tokens partition ids[start:], each window at most
    block_size + 1 tokens, the scored tokens at its end so they get the longest context."""
    out = []
    while start < len(ids):
        end = min(len(ids), start + block_size)
        begin = max(0, end - block_size - 1)
        out.append((ids[begin:end], start - begin))
        start = end
    return out


def _score(model: nn.Module, sequences: Sequence[Sequence[int]], starts: Sequence[int], batch_size: int) -> torch.Tensor:
    """(N,) float64 sums for sequences that fit the model (see sequence_log_likelihoods)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = torch.zeros(len(sequences), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            width = max(len(sequences[i]) for i in batch) - 1
            idx = torch.zeros((len(batch), max(width, 1)), dtype=torch.long)  # (B, T); padding never a target
            targets = torch.full_like(idx, _IGNORE)  # (B, T): target t follows input t
            for row, i in enumerate(batch):
                ids = torch.as_tensor(sequences[i], dtype=torch.long)
                idx[row, :len(ids) - 1] = ids[:-1]
                targets[row, starts[i] - 1:len(ids) - 1] = ids[starts[i]:]
            hidden = model.hidden_states(idx.to(device))  # (B, T, C)
            out[batch] = sequence_logps(hidden, model.lm_head.weight, targets.to(device)).double().cpu()
    finally:
        model.train(was_training)
    return out
