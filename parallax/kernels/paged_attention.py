"""Triton kernels of PagedAttention decode and of the KV-cache write (``reshape_and_cache``).

Layouts (vLLM's, FlashAttention's head-last order):

* q, out: (N, H, D), one query token per sequence; the last dim contiguous.
* k_cache, v_cache: (num_blocks, BLOCK_SIZE, H_kv, D), contiguous; token ``t`` of sequence
  ``n`` lives in block ``block_tables[n, t // BLOCK_SIZE]`` at offset ``t % BLOCK_SIZE``.

``_paged_attn_fwd`` runs one program per (sequence, KV head, partition). The program holds the
queries of all GROUP query heads that share its KV head (GQA), padded to a tile of GROUP_PAD
rows, so each K/V element is read from memory once for the whole group. It walks its token
range BLOCK_N tokens at a time: gather K through the block table, scores with one ``tl.dot``,
online softmax in base 2 (the scale carries log2(e)), gather V, accumulate with a second
``tl.dot`` (P kept in fp32, see ``_pv_dot``). With SPLIT the unnormalised accumulator, the running max and the running sum go to
scratch buffers and ``_paged_attn_reduce`` combines the partitions of each (sequence, head).

Under the CPU interpreter (UPCAST) q and K are converted to fp32 after loading, since the
interpreter's ``tl.dot`` does not take bf16 (triton-lang/triton#11584); products of 16-bit values
are exact in fp32, so the scores are those of the GPU's tensor-core dot.

Block ids that point outside the cache, and context lengths outside [0, max_blocks *
BLOCK_SIZE], are never dereferenced: the program writes NaN for that sequence instead (the
launcher checks on the host for CPU tensors, where it costs nothing).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_paged_attn_fwd", "_paged_attn_reduce", "_reshape_and_cache"]


@triton.jit
def _dot(a, b):
    """a @ b accumulated in fp32; fp32 operands exactly (no TF32)."""
    if a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _pv_dot(p, v):
    """p (fp32) @ v accumulated in fp32, P kept in fp32, as the CUDA kernel does.

    Rounding P to bf16 first (FlashAttention's choice for its compute-bound prefill) costs up to
    2^-9 relative per weight: on contexts of a few dozen tokens that measured 3x PyTorch's own
    bf16 error (tests/ops/test_paged_attention.py). Decode is memory-bound, so V is upcast
    (exactly) and the product runs in TF32 for 16-bit inputs (2^-11 per weight), exactly for fp32.
    """
    if v.dtype == tl.float32:
        c = tl.dot(p, v, input_precision="ieee")
    else:
        c = tl.dot(p, v.to(tl.float32), input_precision="tf32")
    return c


@triton.jit
def _paged_attn_fwd(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_btn,
    num_heads, num_blocks, max_blocks, partition_size, num_partitions,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    start = part * partition_size
    end = tl.minimum(ctx, start + partition_size)
    bad = ((ctx < 0) | (ctx > max_blocks * BLOCK_SIZE)).to(tl.int32)
    end = tl.where(bad != 0, start, end)  # nothing is read for a bad context length

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    # The GROUP query heads of this KV head, zero-padded to GROUP_PAD rows (a tl.dot tile).
    q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btn
    head_off = kv_head.to(tl.int64) * stride_kh
    for tile in range(start, end, BLOCK_N):
        # 1. gather this tile's K rows through the block table
        tok = tile + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        block = tl.load(bt_row + tok // BLOCK_SIZE, mask=tok_ok, other=0)
        block_ok = (block >= 0) & (block < num_blocks)
        bad = bad | tl.max((tok_ok & ~block_ok).to(tl.int32), axis=0)
        load_ok = tok_ok & block_ok
        row_off = block.to(tl.int64) * stride_kb + (tok % BLOCK_SIZE) * stride_kt + head_off
        k = tl.load(k_ptr + row_off[:, None] + dims[None, :], mask=load_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        # 2. scores in base 2, tokens past the end at -inf
        s = _dot(q, tl.trans(k))
        s = tl.where(tok_ok[None, :], s * scale_log2, float("-inf"))
        # 3. online softmax: rescale what was accumulated to the new running max
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # 4. gather V and accumulate P @ V (P rounded to the input dtype, as FlashAttention does)
        v = tl.load(v_ptr + row_off[:, None] + dims[None, :], mask=load_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _pv_dot(p, v)
        m = m_new

    if SPLIT:
        # Partial results of this partition; the reduce kernel reads only non-empty partitions.
        slot = (seq * num_heads + heads).to(tl.int64) * num_partitions + part
        l = tl.where(bad != 0, float("nan"), l)
        tl.store(part_m_ptr + slot, m, mask=row_ok)
        tl.store(part_l_ptr + slot, l, mask=row_ok)
        tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context gives zeros
        out = tl.where(bad != 0, float("nan"), out)
        tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _paged_attn_reduce(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, ctx_ptr,
    stride_on, stride_oh, num_heads, partition_size, num_partitions,
    HEAD_DIM: tl.constexpr, PARTS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    used = tl.minimum(tl.cdiv(tl.maximum(ctx, 0), partition_size), num_partitions)
    base = (seq * num_heads + head).to(tl.int64) * num_partitions
    dims = tl.arange(0, HEAD_DIM)
    # Partitions combined PARTS at a time, with the same online rescaling as the main kernel.
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for first in range(0, used, PARTS):
        parts = first + tl.arange(0, PARTS)
        ok = parts < used
        m_p = tl.load(part_m_ptr + base + parts, mask=ok, other=float("-inf"))
        l_p = tl.load(part_l_ptr + base + parts, mask=ok, other=0.0)
        acc_p = tl.load(part_acc_ptr + (base + parts)[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                        other=0.0)
        m_new = tl.maximum(m, tl.max(m_p, axis=0))
        alpha = tl.exp2(m - m_new)
        w = tl.where(ok, tl.exp2(m_p - m_new), 0.0)
        l = l * alpha + tl.sum(w * l_p, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * acc_p, axis=0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)  # no partition with tokens: zeros
    # A NaN sum marks a partition that saw a bad block id or context length.
    out = tl.where((l != l) | (ctx < 0), float("nan"), out)
    tl.store(out_ptr + seq * stride_on + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _reshape_and_cache(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch, num_slots,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    # The slot, once per head row (one address: a broadcast load). A negative slot (padding) is
    # skipped; so is one past the cache (the launcher checks that on the host for CPU tensors).
    slot = tl.load(slot_ptr + tok + heads * 0).to(tl.int64)
    write = (slot >= 0) & (slot < num_slots) & (heads < NUM_KV_HEADS)
    mask = write[:, None] & (dims[None, :] < HEAD_DIM)
    dst_row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + heads * stride_ch
    dst = dst_row[:, None] + dims[None, :]
    src_k = tok.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = tok.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src_v, mask=mask), mask=mask)
