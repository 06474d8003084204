"""Triton kernel of a LoRA linear layer: one matmul tile loop with the low-rank term in the same
fp32 accumulator.

``out[m, n] = sum_k a[m, k] * b[n, k] + scale * sum_r u[m, r] * c[n, r] (+ bias[n])``, with
a (M, K), b (N, K), u (M, R), c (N, R), bias (N,), out (M, N) (M, N, K, R are ``n_rows``,
``n_cols``, ``n_inner``, ``rank``), rounded once to out's dtype. u and c may be fp32 while a and
b are 16-bit: each product has its own dot precision ('ieee' for fp32 operands). Every operand
is read through its two strides, so transposed views need no copy. The LoRA forward runs it with
a = x, b = W, u = x A^T (precomputed), c = B; the backward's input gradient with a = dy,
b = W^T, u = dy B, c = A^T.

One program per (BLOCK_M, BLOCK_N) tile of out, in groups of GROUP_M row tiles (consecutive
programs share b's column tiles in L2). Row offsets are int64 (M * K may pass 2^31); the inner dim
is walked by advancing pointers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from parallax.kernels.tiles import _tile_ids

__all__ = ["_lora_matmul"]


@triton.jit
def _dot_loop(acc, lhs_ptr, rhs_ptr, rows, cols, mask_rows, mask_cols, inner, stride_lhs_row, stride_lhs_in,
              stride_rhs_col, stride_rhs_in, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + lhs[rows, :] @ rhs[cols, :]^T over ``inner`` elements, BLOCK at a time (fp32). The
    pointers advance by BLOCK steps: no int32 product of an offset and a stride can overflow."""
    steps = tl.arange(0, BLOCK)
    lhs = lhs_ptr + rows.to(tl.int64)[:, None] * stride_lhs_row + steps[None, :] * stride_lhs_in
    rhs = rhs_ptr + cols.to(tl.int64)[None, :] * stride_rhs_col + steps[:, None] * stride_rhs_in
    for start in range(0, inner, BLOCK):
        in_range = start + steps < inner
        lhs_tile = tl.load(lhs, mask=mask_rows[:, None] & in_range[None, :], other=0.0)
        rhs_tile = tl.load(rhs, mask=in_range[:, None] & mask_cols[None, :], other=0.0)
        acc = tl.dot(lhs_tile, rhs_tile, acc, input_precision=DOT_PRECISION)
        lhs += BLOCK * stride_lhs_in
        rhs += BLOCK * stride_rhs_in
    return acc


@triton.jit
def _lora_matmul(a_ptr, b_ptr, u_ptr, c_ptr, bias_ptr, out_ptr, n_rows, n_cols, n_inner, rank, scale,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_um, stride_ur, stride_cn, stride_cr,
                 stride_om, stride_on, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 LOW_RANK_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    tile_m, tile_n = _tile_ids(n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_rows = rows < n_rows
    mask_cols = cols < n_cols
    # the low-rank term first, scaled once, then the full-rank product accumulates onto it
    low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    low_rank = _dot_loop(low_rank, u_ptr, c_ptr, rows, cols, mask_rows, mask_cols, rank, stride_um, stride_ur,
                         stride_cn, stride_cr, BLOCK_R, LOW_RANK_PRECISION)
    acc = _dot_loop(low_rank * scale, a_ptr, b_ptr, rows, cols, mask_rows, mask_cols, n_inner, stride_am, stride_ak,
                    stride_bn, stride_bk, BLOCK_K, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_cols, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_cols[None, :])
