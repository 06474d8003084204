"""Triton kernels of RMSNorm, forward and backward, with Hugging Face LlamaRMSNorm's numerics.

x is viewed as (n_rows, n_cols) with unit column stride and any row stride. Per row, in fp32:
rstd = 1 / sqrt(mean(x^2) + eps); normed = x * rstd, rounded to x's dtype; y = w * normed,
rounded to y's dtype (the product of two 16-bit values is exact in fp32, so this is PyTorch's
``weight * normed.to(input_dtype)`` to the bit).

Forward: one program per BLOCK_R rows, each row held whole (BLOCK_C >= n_cols), so a small
n_cols (QK-norm over a head dim) still gives each program a few thousand elements. The row's
rstd is saved for the backward.

Backward: with g = dy * w and n = x * rstd (fp32, unrounded),
dx = rstd * (g - n * mean(g * n)); dw = sum over rows of dy * normed (normed rounded, as the
forward used it). Each program walks a contiguous range of rows and writes one fp32 partial
sum of dw; the launcher sums the partials (deterministic: no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_rms_norm_fwd", "_rms_norm_bwd"]

# Row counts only bound masks and loops: a compiled variant per value's divisibility (Triton's
# default for ints) would only multiply compile time. Row strides stay specialized: a stride
# divisible by 16 lets every row load in wide vectors.
_NO_SPECIALIZE = ["n_rows", "rows_per_program"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # mean of squares in fp32, then the reciprocal root
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # normalise, round to x's dtype, scale by the weight, round to y's dtype
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = w[None, :] * normed
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program,
                  stride_dy, stride_x, stride_dx, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  COMPUTE_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        # dx = rstd * (g - n * mean(g * n)): the gradient through the row's normalisation
        c = tl.sum(g * n, axis=1) / n_cols
        dx = (g - n * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            normed = n.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * normed, axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=col_ok)
