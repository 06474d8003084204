"""Triton kernels of FlashAttention-2: the forward pass and a deterministic backward pass.

Layouts (FlashAttention's): q, o, do, dq (B, S_q, H, D); k, v, dk, dv (B, S_k, H_kv, D); lse and
delta (B, H, S_q) fp32. Every tensor is addressed through its strides, so views (transposes,
slices of a fused QKV projection, expanded batch dims) need no copy. Packed variable-length
batches (VARLEN) use the same kernels: the batch program id picks a sequence, whose token
range comes from the cu_seqlens arrays, and the batch strides are 0.

Scores are kept in base 2: ``qk_scale`` is softmax_scale * log2(e), so every exponential is an
``exp2``. The log-sum-exp stored for the caller is in natural log.

Causal masking is aligned to the bottom-right corner (FlashAttention >= 2.1): query row i may
attend key j when j <= i + S_k - S_q. Each program splits its loop into blocks that need no
mask (wholly inside the causal region and the sequence) and the few that do; rows that attend
to no key (i < S_q - S_k) get o = 0 and lse = -inf, and contribute no gradient.

Backward (FlashAttention-2's): ``_attn_bwd_preprocess`` computes delta = rowsum(o * do);
``_attn_bwd_dkdv`` owns one block of keys of one KV head and walks the query blocks of every
query head of its group (GQA/MQA), so dk and dv are accumulated in registers and written once;
``_attn_bwd_dq`` owns one block of queries and walks the keys. No atomics: the result is
bitwise deterministic.

Head dims that are not a power of two are padded to BLOCK_D (the next power of two, at least
16, the smallest ``tl.dot`` size) with masked loads and stores.

The ``*_CONFIGS`` lists are autotuning candidates for H100-class GPUs, chosen per padded head
dim by ``_candidates`` (which also drops configs whose shared memory would not fit); the autotuning
key is the head dim, causality and varlen (the autotuner adds the dtypes). Lengths are not in
the key, so that a training run with varying lengths tunes once: the first call of each key
tunes, on its shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq",
    "_attn_fwd_tuned", "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned",
    "FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS", "INTERPRETER_BLOCKS", "default_config",
]

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
# Lengths and group size only bound loops and masks, and the lse/delta strides address a few
# floats per row: compiling a variant for each of their values' divisibility (Triton's default
# for ints) would only multiply compile time.
_NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "GROUP", "stride_lb", "stride_lh"]


# --------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """First token and length of batch entry ``b`` in q and in k (packed sequences when VARLEN)."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        k_start = b * 0
    return q_start.to(tl.int64), k_start.to(tl.int64), seqlen_q, seqlen_k


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows >= n_rows (when CHECK_ROWS) and padded columns read 0."""
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, value, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, leaving out rows >= n_rows and padded columns."""
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, value, mask=mask)


# --------------------------------------------------------------------------------------------
# forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                    lo, hi, seqlen_k, causal_offset, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi): acc, l_i (row sums) and m_i (row maxima, base 2)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # scores of this key block, in base 2
        k = _load_tile(K_base + cols[:, None] * stride_ks, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:  # keys past the sequence, and (causal) past each row's diagonal
            valid = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_offset)
            qk = tl.where(valid, qk, float("-inf"))
        # new running max; a row with no key so far keeps -inf, and exponentiates against 0
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.exp2(qk - m_ref[:, None])
        # rescale what was accumulated under the old max, then add this block
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_base + cols[:, None] * stride_vs, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale,
              stride_qb, stride_qs, stride_qh, stride_qd,
              stride_kb, stride_ks, stride_kh, stride_kd,
              stride_vb, stride_vs, stride_vh, stride_vd,
              stride_ob, stride_os, stride_oh, stride_od,
              stride_lb, stride_lh,
              seqlen_q, seqlen_k, GROUP,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch entry, query head)."""
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the longest programs (last rows) first, for a better tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    h_kv = h // GROUP
    bb = b.to(tl.int64)
    Q_base = Q + bb * stride_qb + q_start * stride_qs + h.to(tl.int64) * stride_qh
    K_base = K + bb * stride_kb + k_start * stride_ks + h_kv.to(tl.int64) * stride_kh
    V_base = V + bb * stride_vb + k_start * stride_vs + h_kv.to(tl.int64) * stride_vh
    O_base = O + bb * stride_ob + q_start * stride_os + h.to(tl.int64) * stride_oh
    L_base = LSE + bb * stride_lb + h.to(tl.int64) * stride_lh + q_start

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, offs_m, seqlen_q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    K_base = K_base + offs_d[None, :] * stride_kd
    V_base = V_base + offs_d[None, :] * stride_vd

    # key ranges: [0, full_end) needs no mask; [full_end, hi) does (sequence end, diagonal)
    causal_offset = seqlen_k - seqlen_q
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        full_end = tl.minimum(seqlen_k, tl.maximum(start_m + 1 + causal_offset, 0)) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                                    0, full_end, seqlen_k, causal_offset, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                                    full_end, hi, seqlen_k, causal_offset, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION)

    # normalise; rows that saw no key output 0 and log-sum-exp -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(L_base + offs_m, lse, mask=offs_m < seqlen_q)
    _store_tile(O_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
                offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["seqlen_q", "stride_lb", "stride_lh"])
def _attn_bwd_preprocess(O, DO, DELTA, CU_Q,
                         stride_ob, stride_os, stride_oh, stride_od,
                         stride_dob, stride_dos, stride_doh, stride_dod,
                         stride_lb, stride_lh, seqlen_q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do) in fp32, the softmax-gradient correction of every query row."""
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, _, seqlen_q, _ = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen_q:
        return
    bb = b.to(tl.int64)
    hh = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + bb * stride_ob + q_start * stride_os + hh * stride_oh
                   + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + bb * stride_dob + q_start * stride_dos + hh * stride_doh
                    + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                    offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bb * stride_lb + hh * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, stride_qs, stride_dos,
                         offs_m, offs_n, offs_d, lo, hi, seqlen_q, causal_offset, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv of one key block over the query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_tile(Q_base + rows[:, None] * stride_qs, rows, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse2 = tl.load(L_base + rows, mask=rows < seqlen_q, other=0.0) * LOG2E
        else:
            lse2 = tl.load(L_base + rows) * LOG2E
        # P^T = exp(K Q^T * scale - lse): the probabilities, recomputed, keys along the rows
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        pT = tl.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:  # query rows past the sequence, and (causal) keys past each row's diagonal
            valid = rows[None, :] < seqlen_q
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= rows[None, :] + causal_offset)
            pT = tl.where(valid, pT, 0.0)
        # dV += P^T dO
        do = _load_tile(DO_base + rows[:, None] * stride_dos, rows, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # dS^T = P^T * (V dO^T - delta); dK += dS^T Q (scaled once at the end)
        if MASKED:
            delta = tl.load(D_base + rows, mask=rows < seqlen_q, other=0.0)
        else:
            delta = tl.load(D_base + rows)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, qk_scale, sm_scale,
                   stride_qb, stride_qs, stride_qh, stride_qd,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd,
                   stride_dob, stride_dos, stride_doh, stride_dod,
                   stride_dkb, stride_dks, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvs, stride_dvh, stride_dvd,
                   stride_lb, stride_lh,
                   seqlen_q, seqlen_k, GROUP,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dk and dv of BLOCK_N keys of one (batch entry, KV head), summed over its group."""
    b = tl.program_id(1)
    h_kv = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seqlen_k:
        return
    bb = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K_base = K + bb * stride_kb + k_start * stride_ks + h_kv.to(tl.int64) * stride_kh
    V_base = V + bb * stride_vb + k_start * stride_vs + h_kv.to(tl.int64) * stride_vh
    k = _load_tile(K_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, offs_n, seqlen_k, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, offs_n, seqlen_k, offs_d,
                   HEAD_DIM, BLOCK_D, True)

    # query ranges (row indices, multiples of BLOCK_M): [lo, mid) masked (diagonal), [mid, full_end)
    # unmasked, [full_end, end) masked (sequence end). Causal: row i sees key j when j <= i + offset.
    causal_offset = seqlen_k - seqlen_q
    end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M  # first row seeing any key here
        first_full = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)  # first row seeing all of them
        mid = tl.maximum(lo, tl.minimum(tl.cdiv(first_full, BLOCK_M) * BLOCK_M, end))
    else:
        lo = start_n * 0
        mid = lo
    full_end = tl.maximum(mid, seqlen_q // BLOCK_M * BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):  # every query head that reads this KV head
        h = (h_kv * GROUP + g).to(tl.int64)
        Q_base = Q + bb * stride_qb + q_start * stride_qs + h * stride_qh + offs_d[None, :] * stride_qd
        DO_base = DO + bb * stride_dob + q_start * stride_dos + h * stride_doh + offs_d[None, :] * stride_dod
        L_base = LSE + bb * stride_lb + h * stride_lh + q_start
        D_base = DELTA + bb * stride_lb + h * stride_lh + q_start
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, stride_qs, stride_dos,
                                      offs_m, offs_n, offs_d, lo, mid, seqlen_q, causal_offset, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, True, IS_CAUSAL, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, stride_qs, stride_dos,
                                      offs_m, offs_n, offs_d, mid, full_end, seqlen_q, causal_offset, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, False, IS_CAUSAL, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, stride_qs, stride_dos,
                                      offs_m, offs_n, offs_d, full_end, end, seqlen_q, causal_offset, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, True, IS_CAUSAL, DOT_PRECISION)

    dk = dk * sm_scale
    DK_base = DK + bb * stride_dkb + k_start * stride_dks + h_kv.to(tl.int64) * stride_dkh
    DV_base = DV + bb * stride_dvb + k_start * stride_dvs + h_kv.to(tl.int64) * stride_dvh
    _store_tile(DK_base + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV_base + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                       lo, hi, seqlen_k, causal_offset, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dq of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(K_base + cols[:, None] * stride_ks, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(V_base + cols[:, None] * stride_vs, cols, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        # P = exp(Q K^T * scale - lse), recomputed
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            valid = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(valid, p, 0.0)
        # dS = P * (dO V^T - delta); dQ += dS K (scaled once at the end)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, qk_scale, sm_scale,
                 stride_qb, stride_qs, stride_qh, stride_qd,
                 stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd,
                 stride_dob, stride_dos, stride_doh, stride_dod,
                 stride_dqb, stride_dqs, stride_dqh, stride_dqd,
                 stride_lb, stride_lh,
                 seqlen_q, seqlen_k, GROUP,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dq of BLOCK_M query rows of one (batch entry, query head)."""
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    h_kv = h // GROUP
    bb = b.to(tl.int64)
    hh = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + bb * stride_qb + q_start * stride_qs + hh * stride_qh
                   + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + bb * stride_dob + q_start * stride_dos + hh * stride_doh
                    + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                    offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    row_ok = offs_m < seqlen_q
    lse2 = tl.load(LSE + bb * stride_lb + hh * stride_lh + q_start + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bb * stride_lb + hh * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
    K_base = K + bb * stride_kb + k_start * stride_ks + h_kv.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    V_base = V + bb * stride_vb + k_start * stride_vs + h_kv.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd

    # key ranges as in the forward: [0, full_end) unmasked, [full_end, hi) masked
    causal_offset = seqlen_k - seqlen_q
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        full_end = tl.minimum(seqlen_k, tl.maximum(start_m + 1 + causal_offset, 0)) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                            0, full_end, seqlen_k, causal_offset, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                            full_end, hi, seqlen_k, causal_offset, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ + bb * stride_dqb + q_start * stride_dqs + hh * stride_dqh
                + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
                dq.to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------------
# configurations: fixed small blocks under the interpreter, autotuned candidates on GPUs

# Under TRITON_INTERPRET=1 (CPU tests): small blocks, and different M and N so that block
# boundaries of queries and keys do not line up.
INTERPRETER_BLOCKS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
    "dq": dict(BLOCK_M=32, BLOCK_N=16),
    "preprocess": dict(BLOCK_M=32),
}


def _table(rows):
    return {d: [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfgs]
            for d, cfgs in rows.items()}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim (BLOCK_D <= key); the first
# entry of each list is the default when autotuning is off.
_FWD = _table({
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
})
# dkdv: BLOCK_N keys held by the program, BLOCK_M the query tile it walks with.
_DKDV = _table({
    64: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    128: [(32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 2), (64, 64, 4, 2)],
    256: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
})
# dq: BLOCK_M queries held by the program, BLOCK_N the key tile it walks with.
_DQ = _table({
    64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
    128: [(128, 32, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    256: [(64, 32, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
})
# fp32 inputs multiply exactly ("ieee": FMA, no tensor cores): a correctness path, not a fast
# one, given one small tile for every head dim, which also keeps its compile time (which grows
# with the tile: unrolled FMAs) to seconds instead of the better part of a minute.
_FP32 = {kind: triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
         for kind in ("fwd", "dkdv", "dq")}
FWD_CONFIGS = [c for cfgs in _FWD.values() for c in cfgs] + [_FP32["fwd"]]
DKDV_CONFIGS = [c for cfgs in _DKDV.values() for c in cfgs] + [_FP32["dkdv"]]
DQ_CONFIGS = [c for cfgs in _DQ.values() for c in cfgs] + [_FP32["dq"]]
_TABLES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}


def _smem_bytes(kind: str, cfg, block_d: int, itemsize: int) -> int:
    """Shared memory of one program: the pipelined pair of tiles (k and v, or q and do) times
    num_stages, plus the tiles held for the whole program (q in the forward; the backward keeps
    two). For 16-bit inputs an upper bound of what Triton 3.9 allocates for sm_90 on every
    candidate above (checked by compiling them all ahead of time)."""
    m, n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    held, streamed = (m, n) if kind in ("fwd", "dq") else (n, m)
    held_tiles = 1 if kind == "fwd" else 2
    return (held_tiles * held + 2 * cfg.num_stages * streamed) * block_d * itemsize


def _max_smem() -> int:
    try:
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    except Exception:  # no CUDA device: nothing to prune against
        return 1 << 30


def default_config(kind: str, block_d: int, itemsize: int):
    """The configuration used when autotuning is off: the first candidate for this head dim that fits."""
    return _candidates(kind, block_d, itemsize)[0]


def _candidates(kind: str, block_d: int, itemsize: int):
    """The configurations worth trying for this kernel, padded head dim and element size."""
    if itemsize == 4:
        return [_FP32[kind]]
    table = _TABLES[kind]
    cfgs = table[min(d for d in table if d >= block_d)]
    limit = _max_smem()
    fitting = [c for c in cfgs if _smem_bytes(kind, c, block_d, itemsize) <= limit]
    return fitting or [min(cfgs, key=lambda c: _smem_bytes(kind, c, block_d, itemsize))]


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        return _candidates(kind, kwargs["BLOCK_D"], named_args["Q"].element_size())

    return {"early_config_prune": prune}


_KEY = ["HEAD_DIM", "IS_CAUSAL", "VARLEN"]
_attn_fwd_tuned = triton.autotune(FWD_CONFIGS, key=_KEY, prune_configs_by=_pruner("fwd"))(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(DKDV_CONFIGS, key=_KEY, prune_configs_by=_pruner("dkdv"))(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(DQ_CONFIGS, key=_KEY, prune_configs_by=_pruner("dq"))(_attn_bwd_dq)
