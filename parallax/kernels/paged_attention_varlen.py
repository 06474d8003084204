"""Triton kernel of paged attention over packed variable-length queries (prefill, chunked prefill
and decode in one launch; vLLM's "unified" attention).

Layouts (vLLM's, FlashAttention's head-last order):

* q, out: (T, H, D), the new tokens of S sequences back to back; sequence ``s`` owns rows
  ``cu_q[s] .. cu_q[s + 1] - 1``; the last dim contiguous.
* k_cache, v_cache: (num_blocks, BLOCK_SIZE, H_kv, D), contiguous; token ``t`` of sequence ``s``
  lives in block ``block_tables[s, t // BLOCK_SIZE]`` at offset ``t % BLOCK_SIZE``.
* ctx[s]: tokens of sequence ``s`` in the cache, its new ones included; the n new queries are
  its last n positions, so query j sits at position ``ctx - n + j`` and sees the keys at
  positions <= its own (and, with SLIDING, > its own - window).

``_paged_attn_varlen_fwd`` runs one program per (query tile, KV head). A query tile is BLOCK_Q
consecutive new tokens of one sequence; the tiles of sequence ``s`` are numbered from
``cu_q[s] // BLOCK_Q + s`` on, so the grid (``T // BLOCK_Q + S`` tiles, an upper bound of every
sequence's ceil(n / BLOCK_Q) summed) needs no host sync, and a program finds its sequence by a
binary search over cu_q (vLLM's scheme); spare tiles return at once. The tile holds the queries of
all GROUP query heads sharing its KV head (GQA), row ``r`` being token ``r // GROUP_PAD`` and head
``r % GROUP_PAD``, so each K/V element is read once per group. The program walks only the keys
its queries can see, BLOCK_N at a time: from the window start of its first query (0 without a
window), rounded down to BLOCK_N, to its last query's position. Each step gathers K through the
block table, scores it with one ``tl.dot``, masks (causal, window), updates the online softmax in
base 2 (the scale carries log2(e)), gathers V and accumulates P @ V with a second ``tl.dot``.
Block-table entries of blocks wholly before the first key a sequence's queries can see are never
read, so an engine may free the blocks that slid out of a window.

Precision: fp32 scores, softmax statistics and accumulators; fp32 inputs multiply exactly (no
TF32). For 16-bit inputs P is rounded to the input dtype before P @ V, as FlashAttention does
(prefill is compute-bound, and a 16-bit dot runs at twice TF32's rate); the tests hold that to
twice PyTorch's own error at the same precision, decodes included.

Block ids that point outside the cache, and context lengths outside [n, max_blocks * BLOCK_SIZE],
are never dereferenced: the program writes NaN for its query tile instead (the launcher checks
on the host for CPU tensors, where it costs nothing). Rows at or past T are never read or written.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_paged_attn_varlen_fwd", "launch_config"]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def launch_config(max_seqlen_q: int, group: int, head_dim: int, block_size: int, element_size: int,
                  interpreted: bool) -> dict:
    """Tile sizes and launch options of ``_paged_attn_varlen_fwd``: the constexprs GROUP_PAD,
    BLOCK_Q and BLOCK_N, plus num_warps and num_stages.

    A tile has BLOCK_Q * GROUP_PAD query rows (at least 16, the smallest ``tl.dot``): 16 when
    every sequence decodes one token (memory-bound: more rows are wasted work) and under the
    interpreter (small tiles cross more boundaries in small tests); 32 for fp32 inputs (exact FMA
    dots, a correctness path whose compile time grows with the tile); else 128 rows for D <= 64
    and 64 above. BLOCK_N is a multiple of the cache block size, so a key step reads whole blocks.
    """
    group_pad = _next_pow2(group)
    if interpreted or max_seqlen_q <= 1:
        rows = 16
    elif element_size == 4:
        rows = 32
    else:
        rows = 128 if head_dim <= 64 else 64
    block_q = min(max(1, rows // group_pad), _next_pow2(max(max_seqlen_q, 1)))
    block_q = max(block_q, 16 // min(group_pad, 16))
    if interpreted:
        block_n = max(16, block_size)
    elif element_size == 4 or head_dim > 128:
        block_n = max(32, block_size)
    else:
        block_n = max(64, block_size)
    tile_rows = block_q * group_pad
    return dict(GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=8 if tile_rows >= 128 else 4,
                num_stages=2)


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b accumulated in fp32; fp32 operands exactly (no TF32)."""
    if a.dtype == tl.float32:
        c = tl.dot(a, b, acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc)
    return c


@triton.jit
def _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first tile ``cu_q[s] // BLOCK_Q + s`` is <= ``tile``."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_q_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["window", "num_seqs", "total_q"])
def _paged_attn_varlen_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, cu_q_ptr, ctx_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_btn,
    num_seqs, total_q, num_blocks, max_blocks,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_q_ptr + seq)
    n_q = tl.load(cu_q_ptr + seq + 1) - q_start
    q_first = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q  # this tile's first query, within the sequence
    if q_first >= n_q:
        return
    ctx = tl.load(ctx_ptr + seq)

    # 1. the tile's query rows: BLOCK_Q tokens x the GROUP heads of this KV head (padded rows read 0)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = q_first + rows // GROUP_PAD
    g = rows % GROUP_PAD
    heads = kv_head * GROUP + g
    tok_row = (q_start + q_idx).to(tl.int64)
    row_ok = (q_idx < n_q) & (g < GROUP) & (tok_row < total_q)
    pos = ctx - n_q + q_idx  # each query's position in its sequence
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok_row[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)

    # 2. the keys any query of the tile sees: [window start of the first, last query's position];
    # steps start at multiples of BLOCK_N, but keys before key_lo are neither looked up nor loaded
    key_end = ctx - n_q + tl.minimum(q_first + BLOCK_Q, n_q)
    key_lo = 0
    if SLIDING:
        key_lo = tl.maximum(ctx - n_q + q_first - window + 1, 0)
    bad = ((ctx < n_q) | (ctx > max_blocks * BLOCK_SIZE)).to(tl.int32)
    key_end = tl.where(bad != 0, key_lo, key_end)  # nothing is read for a bad context length

    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btn
    head_off = kv_head.to(tl.int64) * stride_kh
    for start in range(key_lo // BLOCK_N * BLOCK_N, key_end, BLOCK_N):
        # 3. gather this step's K rows through the block table
        tok = start + tl.arange(0, BLOCK_N)
        tok_ok = tok < key_end
        if SLIDING:
            tok_ok = tok_ok & (tok >= key_lo)
        block = tl.load(bt_row + tok // BLOCK_SIZE, mask=tok_ok, other=0)
        block_ok = (block >= 0) & (block < num_blocks)
        bad = bad | tl.max((tok_ok & ~block_ok).to(tl.int32), axis=0)
        load_ok = tok_ok & block_ok
        kv_off = block.to(tl.int64) * stride_kb + (tok % BLOCK_SIZE) * stride_kt + head_off
        k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=load_ok[:, None], other=0.0)
        # 4. scores in base 2; keys after a query (causal) or out of its window at -inf
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_N], tl.float32)) * scale_log2
        visible = tok[None, :] <= pos[:, None]
        if SLIDING:
            visible = visible & (tok[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        # 5. online softmax; a row that has seen no key yet keeps m = -inf and exponentiates against 0
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # 6. gather V and accumulate P @ V (P rounded to the input dtype)
        v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=load_ok[:, None], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out = tl.where(bad != 0, float("nan"), out)
    tl.store(out_ptr + tok_row[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
