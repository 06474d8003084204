"""Triton kernel of rotary position embeddings (RoPE) for q and k in one launch.

Hugging Face's non-interleaved convention ("rotate_half"): with x1 = x[..., :D/2] and
x2 = x[..., D/2:], out1 = x1 cos - x2 sin and out2 = x2 cos + x1 sin, in fp32, rounded to x's
dtype. The backward is the same rotation by the opposite angle (INVERSE: sin -> -sin) applied
to the output gradients.

Layouts: q (B, T, H, D), k (B, T, H_kv, D), read through their strides (slices of a fused QKV
projection need no copy); cos and sin (B or 1, T, D/2), any strides (a batch stride of 0 reads
one table for every batch entry). Outputs are contiguous.

The work is cut into rows, one row a (token, head) pair: row r of q is token r // H, head r % H.
A program rotates BLOCK_R rows, of q when its program id is below q_blocks, else of k: one launch
serves both tensors. Each row loads its token's angles; the heads of one token share them
through the cache.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_rotary_embedding"]


@triton.jit
def _rotate_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, first_row, n_rows, seqlen, n_heads, stride_b, stride_t,
                 stride_h, stride_d, stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate rows [first_row, first_row + BLOCK_R) of x (B, T, heads, D) into the contiguous out."""
    rows = first_row + tl.arange(0, BLOCK_R).to(tl.int64)
    token = rows // n_heads
    head = rows % n_heads
    b = token // seqlen
    t = token % seqlen
    d = tl.arange(0, HALF_PAD)
    mask = (rows < n_rows)[:, None] & (d < HALF)[None, :]
    # each row's angles
    cos = tl.load(cos_ptr + (b * stride_cb + t * stride_ct)[:, None] + d[None, :] * stride_cd, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + (b * stride_sb + t * stride_st)[:, None] + d[None, :] * stride_sd, mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    # the two halves, rotated in fp32
    src = x_ptr + (b * stride_b + t * stride_t + head * stride_h)[:, None] + d[None, :] * stride_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    dst = out_ptr + rows[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_embedding(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seqlen, n_q_heads, n_k_heads, q_rows,
                      k_rows, q_blocks, stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh,
                      stride_kd, stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
                      HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr):
    pid = tl.program_id(0)
    if pid < q_blocks:
        _rotate_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, pid.to(tl.int64) * BLOCK_R, q_rows, seqlen, n_q_heads,
                     stride_qb, stride_qt, stride_qh, stride_qd, stride_cb, stride_ct, stride_cd, stride_sb,
                     stride_st, stride_sd, HALF, HALF_PAD, BLOCK_R, INVERSE)
    else:
        _rotate_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, (pid - q_blocks).to(tl.int64) * BLOCK_R, k_rows, seqlen,
                     n_k_heads, stride_kb, stride_kt, stride_kh, stride_kd, stride_cb, stride_ct, stride_cd,
                     stride_sb, stride_st, stride_sd, HALF, HALF_PAD, BLOCK_R, INVERSE)
