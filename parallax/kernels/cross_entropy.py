"""Triton kernel of the cross-entropy step of ``parallax.ops.linear_cross_entropy``.

``_cross_entropy_fwd_bwd`` runs one program per row of a chunk of logits (rows, V), in the
logits' dtype (fp16, bf16 or fp32), all arithmetic in fp32:

1. one pass over the row, BLOCK_V columns at a time: running max and rescaled sum of exp
   (online softmax), hence lse = log(sum(exp(logits))) of the fp32 logits;
2. loss = lse - logits[target], or 0 where target == ignore_index;
3. with COMPUTE_GRAD, a second pass overwrites the row in place with
   d loss / d logits = (softmax - onehot(target)) * scale, where scale is the row's factor
   (1 / number of counted targets for 'mean', 1 for 'sum', grad_output[row] for 'none'),
   and 0 on ignored rows, so that the caller's next matmuls read the gradient from the same
   buffer that held the logits: no second (rows, V) tensor.

A target outside [0, V) that is not ignore_index is never dereferenced (its logit reads as 0);
the launcher checks targets on the host for CPU tensors, where that costs nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_cross_entropy_fwd_bwd"]


@triton.jit
def _cross_entropy_fwd_bwd(
    logits_ptr, targets_ptr, loss_ptr, scale_ptr,
    stride_row, stride_scale, n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    counted = target != ignore_index
    offsets = tl.arange(0, BLOCK_V)

    # pass 1: online log-sum-exp over the vocabulary, BLOCK_V columns at a time
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        x = tl.load(logits_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    # the loss of the row: lse - logit of the target (0 where the target is ignored)
    in_range = counted & (target >= 0) & (target < n_cols)
    target_logit = tl.load(logits_row + target, mask=in_range, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - target_logit, 0.0))

    # pass 2: overwrite the row with (softmax - onehot) * scale, zero on an ignored row
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row * stride_scale)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            x = tl.load(logits_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            grad = tl.where(counted, grad, 0.0)
            tl.store(logits_row + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)
