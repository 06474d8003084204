"""Triton kernel of the weight-only quantized linear layer: ``x W^T (+ bias)`` with W read in its
stored integer form and dequantized tile by tile in registers.

``out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])`` with x (M, K) and out (M, N) (``n_rows``,
``n_cols``, ``n_inner``), the storage of ``parallax.ops.quant_linear``:

* ``BITS=8``: q (N, K) int8, scale (N,); the int8 tile is converted exactly to x's dtype, the dot
  accumulates ``x q^T`` in fp32 and the per-output-channel scale multiplies the sum once.
* ``BITS=4``: q (N, K // 2) uint8 (even k in the low nibble), scale and zero (N, K // group);
  each tile's bytes are loaded once, contiguously, and split into the even-k and odd-k codes,
  ``(code - zero) * scale`` is formed in fp32 and rounded to x's dtype (as the reference
  dequantizes), and each half meets x's even or odd columns in its own dot. With
  ``GROUP_ALIGNED`` the tile lies in one group (BLOCK_K divides the group size) and loads one
  scale and zero per output channel; otherwise each element reads its own group's.

Split-K (``program_id(1)``, when the (M, N) tiles alone cannot fill the GPU, as at decode
batches): split ``s`` covers inner elements ``[s * k_split, (s + 1) * k_split)`` and writes its fp32
partial sum to ``out[s]`` and ``_sum_splits`` adds them in split order (deterministic, unlike
atomics) and rounds once to the output dtype; with one split the result, bias added, is rounded
once to out's dtype directly. One program per (BLOCK_M, BLOCK_N) tile, in groups of GROUP_M
row tiles; row offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from parallax.kernels.tiles import _tile_ids

__all__ = ["_quant_matmul", "_sum_splits"]


@triton.jit
def _int8_step(acc, x_rows, q_ptr, cols, mask_rows, mask_cols, start, last, stride_xk, stride_qn, stride_qk,
               BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x[:, start:start + BLOCK_K] @ q[cols, same]^T, the int8 codes converted exactly."""
    ks = start + tl.arange(0, BLOCK_K)
    in_range = ks < last
    x_tile = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_rows[:, None] & in_range[None, :], other=0.0)
    w_tile = tl.load(q_ptr + cols.to(tl.int64)[None, :] * stride_qn + ks[:, None] * stride_qk,
                     mask=in_range[:, None] & mask_cols[None, :], other=0)
    return tl.dot(x_tile, w_tile.to(x_tile.dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def _dequantize(codes, scale_ptr, zero_ptr, col_off, mask, mask_cols, ks, start, group_size, stride_sn, stride_sg,
                GROUP_ALIGNED: tl.constexpr):
    """``(code - zero) * scale`` (fp32, as one multiply-add) of a (BLOCK_K // 2, BLOCK_N) tile of
    codes at inner indices ``ks`` (rows) and output channels ``col_off`` (columns)."""
    if GROUP_ALIGNED:  # the whole tile lies in group start // group_size: one scale per column
        group_off = col_off * stride_sn + (start // group_size) * stride_sg
        scale = tl.load(scale_ptr + group_off, mask=mask_cols, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zero_ptr + group_off, mask=mask_cols, other=0.0).to(tl.float32)[None, :]
    else:
        group_off = col_off[None, :] * stride_sn + (ks // group_size)[:, None] * stride_sg
        scale = tl.load(scale_ptr + group_off, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + group_off, mask=mask, other=0.0).to(tl.float32)
    return codes * scale - zero * scale


@triton.jit
def _int4_step(acc, x_rows, q_ptr, scale_ptr, zero_ptr, cols, mask_rows, mask_cols, start, last, group_size,
               stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, GROUP_ALIGNED: tl.constexpr,
               BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x[:, start:start + BLOCK_K] @ W[cols, same]^T from BLOCK_K // 2 packed bytes per
    column, loaded contiguously along k (vector loads): the low nibbles hold the even k and meet
    x's even columns, the high nibbles the odd k and x's odd columns, in two dots."""
    pairs = start // 2 + tl.arange(0, BLOCK_K // 2)  # start is even: k_split and BLOCK_K are
    in_range = pairs < last // 2
    col_off = cols.to(tl.int64)
    mask = in_range[:, None] & mask_cols[None, :]
    packed = tl.load(q_ptr + col_off[None, :] * stride_qn + pairs[:, None] * stride_qk, mask=mask, other=0)
    even = 2 * pairs
    x_mask = mask_rows[:, None] & in_range[None, :]
    x_even = tl.load(x_rows + even[None, :] * stride_xk, mask=x_mask, other=0.0)
    x_odd = tl.load(x_rows + (even + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
    w_even = _dequantize((packed & 0xF).to(tl.float32), scale_ptr, zero_ptr, col_off, mask, mask_cols, even, start,
                         group_size, stride_sn, stride_sg, GROUP_ALIGNED)
    w_odd = _dequantize((packed >> 4).to(tl.float32), scale_ptr, zero_ptr, col_off, mask, mask_cols, even + 1,
                        start, group_size, stride_sn, stride_sg, GROUP_ALIGNED)
    acc = tl.dot(x_even, w_even.to(x_even.dtype), acc, input_precision=DOT_PRECISION)
    return tl.dot(x_odd, w_odd.to(x_odd.dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def _quant_matmul(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, n_rows, n_cols, n_inner, group_size, k_split,
                  stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
                  BITS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    tile_m, tile_n = _tile_ids(n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_rows = rows < n_rows
    mask_cols = cols < n_cols
    first = split * k_split
    last = min(first + k_split, n_inner)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(first, last, BLOCK_K):
        if BITS == 8:
            acc = _int8_step(acc, x_rows, q_ptr, cols, mask_rows, mask_cols, start, last, stride_xk, stride_qn,
                             stride_qk, BLOCK_K, DOT_PRECISION)
        else:
            acc = _int4_step(acc, x_rows, q_ptr, scale_ptr, zero_ptr, cols, mask_rows, mask_cols, start, last,
                             group_size, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, GROUP_ALIGNED, BLOCK_K,
                             DOT_PRECISION)
    if BITS == 8:  # per output channel: one scale multiplies the whole sum
        acc *= tl.load(scale_ptr + cols * stride_sn, mask=mask_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias_ptr + cols, mask=mask_cols, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_cols[None, :])


@triton.jit
def _sum_splits(partial_ptr, out_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s partial[s, i] (fp32, in order s = 0, 1, ...) for contiguous (SPLITS, numel)
    partials, rounded once to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
