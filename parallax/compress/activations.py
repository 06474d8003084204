"""Calibration statistics for pruning: the squared L2 norm of each input feature of chosen linear
layers over every calibration token, gathered with forward hooks in one pass of the dense model."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def input_sq_norms(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor, *,
                   batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{fqn: (in_features,) float32 sum over all N * T calibration tokens of x_j ** 2} for the input
    x of each linear in ``linears``, running ``model`` over ``calib`` (N, T) in batches.

    One forward pass of the unpruned model (Wanda's paper re-feeds each block the pruned previous
    blocks' outputs; the one-pass statistics are what its unstructured scores need and keep this
    independent of the order layers are pruned in)."""
    sums = {fqn: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for fqn, m in linears.items()}

    def accumulate(fqn: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in_features)
            sums[fqn] += x.pow(2).sum(dim=0)
        return hook

    handles = [m.register_forward_pre_hook(accumulate(fqn)) for fqn, m in linears.items()]
    was_training = model.training
    model.eval()
    # hidden_states skips the (B, T, V) logits when the model has it (every parallax family does).
    run = getattr(model, "hidden_states", model)
    device = next(model.parameters()).device
    try:
        for batch in calib.split(batch_size):
            run(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums
