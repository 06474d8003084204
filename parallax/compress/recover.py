"""Recovery fine-tuning after pruning or factorization: a short language-modelling run on the
training split, full or with LoRA, that keeps pruned weights at zero.

Full fine-tuning zeroes the gradients of pruned weights and runs AdamW without weight decay, so
a pruned weight's moments stay zero and so does the weight (the masks are re-applied after each
step as well, which guards against rounding in 16-bit). With LoRA (``lora_r``), the adapters
train on the frozen compressed model and are merged at the end (through the dequantized weight
for a quantized base); merging a dense update into a sparse weight would fill it in, so the
masks are applied to the merged weights (the sparsity is kept exactly, at the cost of the part
of the update that fell on pruned weights).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["recover", "sparsity_masks"]

log = logging.getLogger(__name__)


def sparsity_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """{weight: nonzero mask} for every ``nn.Linear`` weight holding exact zeros (a pruned layer)."""
    masks = {}
    for module in model.modules():
        if type(module) is nn.Linear and bool((module.weight == 0).any()):
            masks[module.weight] = module.weight != 0
    return masks


def recover(model: nn.Module, tokens: torch.Tensor, *, steps: int, lr: float = 1e-4, batch_size: int = 8,
            lora_r: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` AdamW steps on windows of ``tokens`` (N, T + 1) (inputs
    are ``[:, :-1]``, targets ``[:, 1:]``), ``batch_size`` rows per step drawn with ``seed``.
    Returns {"steps", "lora_r", "loss_first", "loss_last"} (losses averaged over the first / last
    tenth of the steps). The model is left in eval mode, LoRA merged."""
    from parallax import optim, peft

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if lora_r is not None and (not isinstance(lora_r, int) or lora_r < 1):
        raise ValueError(f"lora_r: expected a positive int or None (full fine-tuning), got {lora_r!r}")
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.shape[0] < batch_size:
        raise ValueError(f"tokens: expected (N, T + 1) token windows with N >= batch_size={batch_size} and T >= 1, "
                         f"got shape {tuple(tokens.shape)}")
    masks = sparsity_masks(model)
    if lora_r is not None:
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                           target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for weight, mask in masks.items():
        if weight.requires_grad:
            weight.register_hook(lambda grad, mask=mask: grad * mask)
    optimizer = optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        rows = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=generator)]
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _apply(masks)
        losses.append(loss.item())
    if lora_r is not None:
        model = model.merge_and_unload()  # the base layers (and their weight Parameters) come back as they were
        _apply(masks)
    model.eval()
    tenth = max(1, steps // 10)
    report = {"steps": steps, "lora_r": lora_r, "loss_first": sum(losses[:tenth]) / tenth,
              "loss_last": sum(losses[-tenth:]) / tenth}
    log.info("recovery: %d steps, loss %.4f -> %.4f", steps, report["loss_first"], report["loss_last"])
    return report


@torch.no_grad()
def _apply(masks: dict[nn.Parameter, torch.Tensor]) -> None:
    for weight, mask in masks.items():
        weight.mul_(mask)

