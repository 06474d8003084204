"""Triton kernels of the batched multi-LoRA update (Punica's SGMV): two passes over row tiles that
each hold tokens of one adapter.

The launcher sorts the tokens by adapter slot (stably) and cuts each slot's segment of the sorted
order into tiles of BLOCK_M rows; tile g covers sorted positions ``[tile_start[g], tile_end[g])``
of slot ``tile_slot[g]`` (an empty range for the spare tiles of a grid sized without reading the
segment lengths back to the host). ``order[p]`` is the token at sorted position p.

* ``_sgmv_shrink``: ``u[p, r] = sum_k x[order[p], k] * a[slot, r, k]`` in fp32, one program per
  (tile, BLOCK_R ranks); u is kept in sorted order, so the expand pass reads it without a gather.
* ``_sgmv_expand``: ``out[order[p], n] = scaling[slot] * sum_r u[p, r] * b[slot, n, r]``, one
  program per (tile, BLOCK_N columns), walking the rank BLOCK_R at a time; rows of tokens without
  an adapter are never written (the launcher zeroes out).

Every operand is read through its strides; row and slot offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_sgmv_shrink", "_sgmv_expand"]


@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, u_ptr, order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, n_inner, rank,
                 stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_up, stride_ur,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    if start < end:  # a spare tile (past the last segment) does nothing
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        pos = start + tl.arange(0, BLOCK_M)
        mask_pos = pos < end
        tokens = tl.load(order_ptr + pos, mask=mask_pos, other=0).to(tl.int64)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_ranks = ranks < rank
        steps = tl.arange(0, BLOCK_K)
        # the token rows gathered from x, the slot's A read as (BLOCK_K, BLOCK_R) tiles of A^T
        x = x_ptr + tokens[:, None] * stride_xt + steps[None, :] * stride_xk
        a = a_ptr + slot * stride_as + ranks.to(tl.int64)[None, :] * stride_ar + steps[:, None] * stride_ak
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, n_inner, BLOCK_K):
            in_range = k + steps < n_inner
            x_tile = tl.load(x, mask=mask_pos[:, None] & in_range[None, :], other=0.0)
            a_tile = tl.load(a, mask=in_range[:, None] & mask_ranks[None, :], other=0.0)
            # x in the adapters' dtype, as PEFT runs the LoRA path
            acc = tl.dot(x_tile.to(a_ptr.dtype.element_ty), a_tile, acc, input_precision=DOT_PRECISION)
            x += BLOCK_K * stride_xk
            a += BLOCK_K * stride_ak
        u = u_ptr + pos.to(tl.int64)[:, None] * stride_up + ranks[None, :] * stride_ur
        tl.store(u, acc, mask=mask_pos[:, None] & mask_ranks[None, :])


@triton.jit
def _sgmv_expand(u_ptr, b_ptr, scaling_ptr, out_ptr, order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                 n_cols, rank, stride_up, stride_ur, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    if start < end:
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        pos = start + tl.arange(0, BLOCK_M)
        mask_pos = pos < end
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_cols = cols < n_cols
        steps = tl.arange(0, BLOCK_R)
        u = u_ptr + pos.to(tl.int64)[:, None] * stride_up + steps[None, :] * stride_ur
        b = b_ptr + slot * stride_bs + cols.to(tl.int64)[None, :] * stride_bn + steps[:, None] * stride_br
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, rank, BLOCK_R):
            in_range = r + steps < rank
            u_tile = tl.load(u, mask=mask_pos[:, None] & in_range[None, :], other=0.0)
            b_tile = tl.load(b, mask=in_range[:, None] & mask_cols[None, :], other=0.0)
            # 16-bit adapters: the rank-r intermediate rounded to their dtype, as PyTorch's
            # (x A^T) B^T does, and a tensor-core dot; fp32 adapters: an exact fp32 dot
            acc = tl.dot(u_tile.to(b_ptr.dtype.element_ty), b_tile, acc, input_precision=DOT_PRECISION)
            u += BLOCK_R * stride_ur
            b += BLOCK_R * stride_br
        acc *= tl.load(scaling_ptr + slot).to(tl.float32)
        tokens = tl.load(order_ptr + pos, mask=mask_pos, other=0).to(tl.int64)
        out = out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_pos[:, None] & mask_cols[None, :])
