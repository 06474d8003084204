"""What every model family shares around its layers: input checks, the stack of blocks and the
language-model loss."""

from collections.abc import Callable

import torch
import torch.nn as nn

from parallax import ops

from .attention import PackedSegments


def check_token_ids(idx: torch.Tensor, max_positions: int, positions: torch.Tensor | None = None) -> None:
    """Raise ValueError unless idx is (B, T) with T <= max_positions and positions, if given,
    broadcasts to idx's shape."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, T); got {tuple(idx.shape)}")
    if positions is None:
        if idx.size(1) > max_positions:
            raise ValueError(f"sequence length {idx.size(1)} is longer than block_size={max_positions}")
    elif positions.dim() != 2 or positions.size(1) != idx.size(1) or positions.size(0) not in (1, idx.size(0)):
        raise ValueError(f"positions must have shape (B, T) or (1, T) for idx {tuple(idx.shape)}; "
                         f"got {tuple(positions.shape)}")


def shared_blocks(make_block: Callable[[], nn.Module], n_layer: int, share_layers: int = 1) -> nn.ModuleList:
    """The n_layer blocks of a model: ``make_block()`` each, or with share_layers = k > 1 (ALBERT's
    cross-layer sharing) n_layer / k blocks, each at k consecutive positions: the same module
    object, called k times per forward. ``parameters()`` and ``named_parameters()`` list each
    shared weight once (under its first position's name), so optimizers, ZeRO and checkpoints
    hold it once and its gradient sums over every use; ``state_dict()`` names it at every position."""
    distinct = [make_block() for _ in range(n_layer // share_layers)]
    return nn.ModuleList([distinct[i // share_layers] for i in range(n_layer)])


def packed_segments(idx: torch.Tensor, positions: torch.Tensor | None, max_positions: int) -> PackedSegments:
    """The packed examples of idx (B, T) that positions (B or 1, T) mark by restarting at 0; each
    at most max_positions long."""
    if positions is None:
        raise ValueError("a packed forward needs positions (B, T) that restart at 0 at each example")
    segments = PackedSegments.from_positions(positions.expand(idx.shape))
    if segments.max_seqlen > max_positions:
        raise ValueError(f"a packed example of {segments.max_seqlen} tokens is longer than block_size={max_positions}")
    return segments


def lm_loss(h: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
            reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy of hidden states h (B, T, C) under lm_head_weight (V, C), or
    with ``reduction="none"`` each target's (B, T) fp32 (0 where ignored): what preference tuning
    sums per sequence, still without logits.

    Negative targets (-1, or Hugging Face's -100) are left out of the loss. Fused linear +
    cross-entropy (``parallax.ops.linear_cross_entropy``): the (B * T, V) logits are never
    materialised, and the softmax and loss are computed in fp32 (a 16-bit loss loses precision,
    and under fp16 loss scaling its gradient would overflow before reaching the logits). Triton
    on CUDA; the chunked PyTorch path on CPU, also when tests set TRITON_INTERPRET=1.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    flat, hidden = targets.reshape(-1).masked_fill(targets.reshape(-1) < 0, -100), h.reshape(-1, h.size(-1))
    rows = _rows_with_targets(flat)
    selected = rows is not None
    if selected:
        # Only the rows with a target go through the LM head: a prompt, padding or a packed row's
        # boundaries cost nothing there (for completion-only SFT and preference pairs about half the
        # rows; the head is ~25% of a small model's FLOPs). Pretraining rows all have one: no copy.
        hidden, flat = hidden.index_select(0, rows), flat.index_select(0, rows)
    loss = ops.linear_cross_entropy(hidden, lm_head_weight, flat, ignore_index=-100,
                                    backend=None if h.is_cuda else "chunked", reduction=reduction)
    if reduction == "mean" or not selected:
        return loss if reduction == "mean" else loss.float().view(targets.shape)
    return loss.new_zeros(targets.numel(), dtype=torch.float32).index_put((rows,), loss.float()).view(targets.shape)


def _rows_with_targets(flat: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of flat (N,) with a target (>= 0), or None when every row has one or
    the step is being traced (fake tensors for px.plan, torch.compile): a data-dependent shape
    there would stop the trace, and the full head is then the (conservative) estimate."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(flat) or flat.device.type == "meta" or torch.compiler.is_compiling():
        return None
    rows = (flat >= 0).nonzero().squeeze(1)
    return rows if rows.numel() < flat.numel() else None
