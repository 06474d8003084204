"""Paged attention over packed variable-length queries: launcher, checks, dispatch, reference.

``paged_attention_varlen`` attends the new tokens of a batch of sequences (whole prompts, prompt
chunks after a cached prefix, single decode tokens, in any mix) over each sequence's keys and
values in the paged cache that ``reshape_and_cache`` writes, reading them through the block table
where they lie: no packed copy of the context is made (vLLM's "unified" attention).

Semantics:

* The n new queries of a sequence are its LAST n context positions: query j of a sequence with
  context length ctx (its new tokens included, already in the cache) sits at position
  ``p = ctx - n + j`` and attends the keys at positions ``k <= p`` (the causal mask aligned to
  the bottom-right corner, as in FlashAttention >= 2.1). Decodes are the case n = 1.
* ``sliding_window=W`` keeps only the keys with ``p - k < W``: W keys, the query's own included.
  This is Hugging Face's convention (``transformers.masking_utils.sliding_window_overlay``:
  ``kv_idx > q_idx - sliding_window``, the mask of Mistral and Qwen2), which is FlashAttention's
  causal ``window_size=(W - 1, 0)`` (transformers passes flash-attn ``(W - 1, W - 1)`` with causal).
* GQA: H a multiple of H_kv; query head h reads KV head h // (H // H_kv).
* Forward only (inference): the result never requires grad.

Implementations, chosen with ``backend=`` (``parallax.ops.backend("paged_attention_varlen",
device)`` says which one runs by default):

* ``"triton"``: ``parallax/kernels/paged_attention_varlen.py``; the default on CUDA tensors, and
  on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are
  first imported: the tests).
* ``"reference"``: ``paged_attention_varlen_ref``, plain PyTorch (SDPA per sequence over that
  sequence's blocks); the default on CPU, where the inference engine uses it.

Blocks: a sequence's keys are read only from the block holding the first key one of its
queries sees (``context_len - n - W + 1`` with a window W, else 0) up to its context length; the
block-table entries before and after may hold anything (an engine may free the blocks that slid
out of the window, as vLLM does).

Bounds: on CPU tensors the host checks, where it costs nothing, that cu_seqlens_q starts at 0,
never decreases, ends at T and bounds no sequence longer than max_seqlen_q; that every context
length is in ``[n, max_blocks * block_size]``; and that every block id a sequence reads points
into the cache; a violation raises ``ValueError``. On CUDA those checks would need a device-to-host
sync per call, so by default the kernel guards instead: it never dereferences a block id outside
the cache nor a q row at or past T, and writes NaN for the query tokens of a sequence whose
context length is out of range, and for those whose query tile (BLOCK_Q consecutive tokens) needs
a block whose id is out of range. ``validate=True`` runs the host checks for CUDA tensors too (a
few small device ops, then syncs). On CUDA a max_seqlen_q below the longest sequence's new
tokens changes only the tile size, not the result; rows of the output past ``cu_seqlens_q[-1]``
(which must equal T) are left unwritten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallax.ops import _triton
from parallax.ops.paged_attention import check_block_tables, check_cache_inputs

Tensor = torch.Tensor

__all__ = ["paged_attention_varlen", "paged_attention_varlen_ref", "backend", "BACKENDS"]

BACKENDS = ("triton", "reference")
_OP = "paged_attention_varlen"


# ---------------------------------------------------------------------------------------------
# dispatch


def _available(device_type: str) -> list[str]:
    """Implementations that can run on ``device_type``, best first."""
    return ["triton", "reference"] if _triton.default_backend(device_type) == "triton" else ["reference"]


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``paged_attention_varlen`` uses by default for tensors on ``device``:
    'triton' or 'reference'."""
    return _available(torch.device(device).type)[0]


def _pick(requested: str | None, device: torch.device) -> str:
    available = _available(device.type)
    if requested is None:
        return available[0]
    if requested not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {', '.join(BACKENDS)} or None, got {requested!r}")
    if requested not in available:
        raise ValueError(f"{_OP}: backend={requested!r} cannot run on {device.type} tensors here (Triton runs on "
                         "CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 set before the kernels are first "
                         f"imported); available: {', '.join(available)}")
    return requested


# ---------------------------------------------------------------------------------------------
# checks


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
           context_lens: Tensor, max_seqlen_q: int, sliding_window: int | None) -> None:
    """Shapes, dtypes, devices and scalar arguments: everything that needs no look at the data."""
    check_cache_inputs(_OP, q, k_cache, v_cache, block_tables, context_lens)
    if not isinstance(cu_seqlens_q, torch.Tensor):
        raise TypeError(f"{_OP}: cu_seqlens_q must be a tensor, got {type(cu_seqlens_q).__name__}")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1:
        raise ValueError(f"{_OP}: cu_seqlens_q must be a 1-D int32 tensor of num_seqs + 1 offsets, got "
                         f"{cu_seqlens_q.dtype} of shape {tuple(cu_seqlens_q.shape)}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"{_OP}: cu_seqlens_q is on {cu_seqlens_q.device} but q is on {q.device}")
    num_seqs = block_tables.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(f"{_OP}: cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but block_tables has "
                         f"{num_seqs} rows (sequences); it must have num_seqs + 1 = {num_seqs + 1}")
    if context_lens.shape[0] != num_seqs:
        raise ValueError(f"{_OP}: context_lens has {context_lens.shape[0]} entries but block_tables has "
                         f"{num_seqs} rows (sequences)")
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"{_OP}: max_seqlen_q must be a non-negative int, got {max_seqlen_q!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"{_OP}: sliding_window must be None (no window) or an int >= 1, got {sliding_window!r}")


def _validate(q: Tensor, k_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor, context_lens: Tensor,
              max_seqlen_q: int, sliding_window: int | None) -> None:
    """The data checks (syncs on CUDA): cu_seqlens_q's offsets, context lengths >= the new tokens,
    the ids of the blocks holding keys that some query sees in the cache."""
    cu = cu_seqlens_q.long()
    new_tokens = cu[1:] - cu[:-1]
    total = q.shape[0]
    if int(cu[0]) != 0 or bool((new_tokens < 0).any()) or int(cu[-1]) != total:
        raise ValueError(f"{_OP}: cu_seqlens_q must start at 0, never decrease and end at the {total} rows of q; "
                         f"got {cu.tolist()}")
    if new_tokens.numel() and int(new_tokens.max()) > max_seqlen_q:
        i = int(new_tokens.argmax())
        raise ValueError(f"{_OP}: sequence {i} has {int(new_tokens[i])} new tokens (cu_seqlens_q), more than "
                         f"max_seqlen_q = {max_seqlen_q}")
    short = context_lens.long() < new_tokens
    if bool(short.any()):
        i = int(short.nonzero()[0, 0])
        raise ValueError(f"{_OP}: context_lens[{i}] = {int(context_lens[i])} is less than the sequence's "
                         f"{int(new_tokens[i])} new tokens (context lengths count the new tokens, already in "
                         "the cache)")
    block_size = k_cache.shape[1]
    first_blocks = None
    if sliding_window is not None:  # blocks wholly before every query's window are never read
        first_blocks = (context_lens.long() - new_tokens - sliding_window + 1).clamp(min=0) // block_size
    check_block_tables(block_tables, context_lens, k_cache.shape[0], block_size, op=_OP, first_blocks=first_blocks)


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"{_OP}: softmax_scale must be a finite number, got {softmax_scale!r}")
    return scale


# ---------------------------------------------------------------------------------------------
# the op


def paged_attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over a paged KV cache; returns (T, H, D) in q's dtype.

    q: (T, H, D), the new tokens of S sequences back to back (any token and head strides);
    sequence s owns rows ``cu_seqlens_q[s] .. cu_seqlens_q[s + 1] - 1``. k_cache, v_cache:
    (num_blocks, block_size, H_kv, D), contiguous, as ``reshape_and_cache`` writes them, with the
    new tokens already written; block_size in ``BLOCK_SIZES``, D in ``HEAD_DIMS`` of
    ``parallax.ops.paged_attention``, H a multiple of H_kv. block_tables: int32 (S, max_blocks),
    token t of sequence s in block ``block_tables[s, t // block_size]`` at offset
    ``t % block_size``. cu_seqlens_q: int32 (S + 1,), starting at 0 and ending at T.
    context_lens: int32 (S,), each sequence's tokens in the cache, its new ones included (so at
    least its new-token count). max_seqlen_q: the most new tokens of one sequence (sizes the
    tiles; checked on CPU). fp16, bf16 or fp32, accumulated in fp32. A sequence may have no new
    tokens (it is skipped).

    The n new tokens of a sequence are its last n positions: query j at position
    ``p = context_len - n + j`` sees the keys at positions k <= p, and with ``sliding_window=W``
    only those with p - k < W (Hugging Face's ``kv_idx > q_idx - sliding_window``).
    ``softmax_scale`` defaults to 1/sqrt(D). Forward only: the output never requires grad.

    backend: 'triton', 'reference' or None (the default for the device, see ``backend``).
    validate: check offsets, context lengths and block ids on the host (None: on CPU tensors
    only; on CUDA the kernel writes NaN for the query tokens it cannot compute instead).
    """
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, sliding_window)
    chosen = _pick(backend, q.device)
    scale = _scale(softmax_scale, q.shape[2])
    if validate is None:
        validate = q.device.type == "cpu"
    if validate:
        _validate(q, k_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, sliding_window)
    if chosen == "reference":
        return paged_attention_varlen_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                          max_seqlen_q, scale, sliding_window)
    with torch.no_grad():
        return _paged_attention_varlen_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                              max_seqlen_q, scale, sliding_window)


def _paged_attention_varlen_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                   cu_seqlens_q: Tensor, context_lens: Tensor, max_seqlen_q: int, scale: float,
                                   sliding_window: int | None) -> Tensor:
    """The Triton kernel: q (T, H, D) over caches (num_blocks, block_size, H_kv, D) -> (T, H, D)."""
    kernels = _triton.kernels(_OP, "paged_attention_varlen", q.device)
    total, h, d = q.shape
    num_blocks, block_size, h_kv, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    out = torch.empty((total, h, d), dtype=q.dtype, device=q.device)
    if total == 0 or num_seqs == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    block_tables, cu_seqlens_q, context_lens = (t.contiguous() for t in (block_tables, cu_seqlens_q, context_lens))
    cfg = kernels.launch_config(max_seqlen_q, h // h_kv, d, block_size, q.element_size(),
                                interpreted=q.device.type == "cpu")
    # sequence s's tiles start at cu[s] // BLOCK_Q + s: T // BLOCK_Q + S bounds them all
    grid = (total // cfg["BLOCK_Q"] + num_seqs, h_kv)
    kernels._paged_attn_varlen_fwd[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens,
        scale * math.log2(math.e), sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_seqs, total, num_blocks, block_tables.shape[1],
        GROUP=h // h_kv, HEAD_DIM=d, BLOCK_SIZE=block_size, SLIDING=sliding_window is not None, **cfg,
    )
    return out


# ---------------------------------------------------------------------------------------------
# reference


def _visible(n: int, context: int, first_key: int, length: int, sliding_window: int | None,
             device: torch.device) -> Tensor:
    """(n, length) bool: query j (position context - n + j) sees key first_key + i."""
    query_pos = torch.arange(context - n, context, device=device)[:, None]
    key_pos = torch.arange(first_key, first_key + length, device=device)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= query_pos - key_pos < sliding_window
    return visible


@torch.no_grad()
def paged_attention_varlen_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int | None = None,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``paged_attention_varlen`` (same arguments, no checks; max_seqlen_q unused).

    Per sequence: ``index_select`` the whole cache blocks that hold its visible keys (only that
    sequence's blocks, and with a window only those from the first query's window start on), then
    SDPA with the bottom-right causal (and window) mask, in the input dtype (float64 inputs give
    an exact reference). Rows of q past ``cu_seqlens_q[-1]`` come out 0.
    """
    total, h, d = q.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out = torch.zeros((total, h, d), dtype=q.dtype, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for s, context in enumerate(lens):
        q0, q1 = cu[s], cu[s + 1]
        n = q1 - q0
        if n == 0:
            continue
        first_block = 0 if sliding_window is None else max(0, context - n - sliding_window + 1) // block_size
        blocks = block_tables[s, first_block:math.ceil(context / block_size)]
        first_key = first_block * block_size
        length = context - first_key
        k = k_cache.index_select(0, blocks).flatten(0, 1)[:length]  # (length, H_kv, D)
        v = v_cache.index_select(0, blocks).flatten(0, 1)[:length]
        if sliding_window is None and n == 1:
            mask, causal = None, False  # a decode sees its whole context
        elif sliding_window is None and n == length:
            mask, causal = None, True  # a whole prompt: the usual lower triangle
        else:
            mask, causal = _visible(n, context, first_key, length, sliding_window, q.device), False
        y = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=h != h_kv)  # (1, H, n, D)
        out[q0:q1] = y[0].transpose(0, 1)
    return out
