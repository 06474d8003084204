"""The reference GPT's forward over one engine step: a flat batch of tokens with a paged KV cache.

The runner reuses the GPT's own modules and weights (``wte``, ``wpe``, each block's ``ln_1``,
``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp``, then ``ln_f`` and ``lm_head``); only the
attention differs from ``GPT.forward``. A step computes T tokens from S sequences side by side
(no padding): sequences computing one token (decodes) first, then those computing several
(prefills: prompts, prompt chunks, recomputation after preemption). Each layer writes the new
tokens' K/V into the cache (``reshape_and_cache``), then attends from the cache, so a prefill
also sees the tokens that the prefix cache or earlier chunks put there.

Attention implementations (``attention=``):

* ``"paged"``: decode with ``parallax.ops.paged_attention``, prefill with
  ``parallax.ops.flash_attention_varlen`` over K/V gathered from the cache (the CUDA path; on
  CPU tensors the ops dispatch to their references, or to Triton under TRITON_INTERPRET=1);
* ``"torch"``: decode with a batched gather of the cache and SDPA (sequences sorted by context
  length and grouped, so little padding is read), prefill with SDPA per sequence (the CPU path);
* ``"auto"``: ``"paged"`` on CUDA when the kernels take this head size and block size, else ``"torch"``.

Shapes: T tokens this step, H query heads, Hkv KV heads, D head size, C = H * D, V vocabulary,
L layers, N blocks of B slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from parallax import ops
from parallax.models import GPT
from parallax.ops.flash_attention import SUPPORTED_HEAD_DIMS as FLASH_HEAD_DIMS
from parallax.ops.paged_attention import BLOCK_SIZES as PAGED_BLOCK_SIZES
from parallax.ops.paged_attention import HEAD_DIMS as PAGED_HEAD_DIMS

__all__ = ["ModelRunner", "SeqInput", "ATTENTION_IMPLS", "resolve_attention"]

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "paged", "torch")
# Decode sequences attended together by the "torch" path (sorted by context length, so a group's
# padding is small).
DECODE_GROUP = 16


def resolve_attention(attention: str, device: torch.device, head_dim: int, block_size: int) -> str:
    """The implementation ``attention`` means on ``device``: 'paged' or 'torch'."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}; got {attention!r}")
    supported = head_dim in PAGED_HEAD_DIMS and head_dim in FLASH_HEAD_DIMS and block_size in PAGED_BLOCK_SIZES
    if attention == "paged" and not supported:
        raise ValueError(f"attention='paged' needs a head size in {PAGED_HEAD_DIMS} and a block_size in "
                         f"{PAGED_BLOCK_SIZES}; got head size {head_dim}, block_size {block_size}")
    if attention == "auto":
        if device.type == "cuda" and not supported:
            log.warning("inference: the paged kernels do not take head size %d / block_size %d; "
                        "attending with SDPA over gathered K/V instead", head_dim, block_size)
        return "paged" if device.type == "cuda" and supported else "torch"
    return attention


@dataclass
class SeqInput:
    """One sequence's part of a step: compute ``token_ids`` at positions ``start, start + 1, ...``
    with the blocks of ``block_table``; ``sample`` asks for the logits after the last one."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool


@dataclass
class _Batch:
    """The tensors of one step (decodes first, then prefills)."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each token
    logits_rows: torch.Tensor  # (S_sample,) int64: the rows whose logits are returned, in input order
    num_decode: int
    # "paged" decode
    block_tables: torch.Tensor | None  # (num_decode, max_blocks) int32
    context_lens: torch.Tensor | None  # (num_decode,) int32
    # "torch" decode: groups of (first row, last row + 1, block ids (G * W,) int64, mask (G, 1, 1, W * B) bool)
    # where W is the group's widest block table
    decode_groups: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    # prefill: cache slots of every context token of every prefill sequence, packed
    context_slots: torch.Tensor | None  # (total_k,) int64
    cu_q: torch.Tensor | None  # (P + 1,) int32, offsets into the prefill tokens
    cu_k: torch.Tensor | None  # (P + 1,) int32, offsets into context_slots
    max_q: int
    max_k: int
    prefill_spans: list[tuple[int, int, int, int]]  # (q_start, q_end, k_start, k_end) per prefill sequence


class ModelRunner:
    """Runs the GPT over engine steps; owns the KV cache tensor (2, L, N, B, Hkv, D)."""

    def __init__(self, model: GPT, num_blocks: int, block_size: int, attention: str = "auto") -> None:
        cfg = model.config
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.dtype = param.dtype
        self.block_size = block_size
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.attention = resolve_attention(attention, self.device, self.head_dim, block_size)
        # zeros, not empty: the "torch" decode reads (and masks) stale slots, which must be finite
        self.kv_cache = torch.zeros((2, cfg.n_layer, num_blocks, block_size, self.n_kv_head, self.head_dim),
                                    dtype=self.dtype, device=self.device)

    @staticmethod
    def bytes_per_block(model: GPT, block_size: int) -> int:
        """KV-cache bytes of one block across all layers (keys and values)."""
        cfg = model.config
        elem = next(model.parameters()).element_size()
        return 2 * cfg.n_layer * block_size * cfg.kv_heads * cfg.head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst takes block src's keys and values in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Logits (S_sample, V), float32, for the sequences with ``sample`` set, in input order."""
        batch = self._prepare(seqs)
        transformer = self.model.transformer
        x = transformer.wte(batch.input_ids) + transformer.wpe(batch.positions)  # (T, C)
        for layer, block in enumerate(transformer.h):
            x = x + self._attention(layer, block, block.ln_1(x), batch)
            x = x + block.mlp(block.ln_2(x))
        x = transformer.ln_f(x[batch.logits_rows])  # only the rows that sample
        return self.model.lm_head(x).float()  # (S_sample, V)

    def _attention(self, layer: int, block: torch.nn.Module, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        """x (T, C) -> (T, C): causal self-attention of every token over its sequence's cache."""
        T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = block.attn.c_attn(x).split([C, Hkv * D, Hkv * D], dim=1)
        q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]  # (N, B, Hkv, D) each
        paged = self.attention == "paged"
        # "torch" pins the reference write: on CPU the default may be the Triton interpreter (for tests)
        ops.reshape_and_cache(k, v, k_cache, v_cache, b.slot_mapping, backend=None if paged else "reference")
        y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
        nd = b.num_decode
        if nd:
            if paged:
                y[:nd] = ops.paged_attention(q[:nd].contiguous(), k_cache, v_cache, b.block_tables, b.context_lens)
            else:
                y[:nd] = self._decode_gather(q[:nd], k_cache, v_cache, b)
        if nd < T:
            k_ctx = k_cache.view(-1, Hkv, D)[b.context_slots]  # (total_k, Hkv, D)
            v_ctx = v_cache.view(-1, Hkv, D)[b.context_slots]
            if paged:
                y[nd:] = ops.flash_attention_varlen(q[nd:], k_ctx, v_ctx, b.cu_q, b.cu_k, b.max_q, b.max_k,
                                                    causal=True)
            else:
                y[nd:] = self._prefill_sdpa(q[nd:], k_ctx, v_ctx, b)
        return block.attn.c_proj(y.view(T, C))

    def _decode_gather(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       b: _Batch) -> torch.Tensor:
        """q (S, H, D), one token per sequence -> (S, H, D), attending over gathered cache blocks."""
        Hkv, D = self.n_kv_head, self.head_dim
        out = torch.empty_like(q)
        for lo, hi, blocks, mask in b.decode_groups:
            G, L = hi - lo, mask.shape[-1]
            # whole blocks (B x Hkv x D contiguous values each) gather faster than single slots
            k = k_cache.index_select(0, blocks).view(G, L, Hkv, D).transpose(1, 2)  # (G, Hkv, L, D)
            v = v_cache.index_select(0, blocks).view(G, L, Hkv, D).transpose(1, 2)
            y = F.scaled_dot_product_attention(q[lo:hi, :, None], k, v, attn_mask=mask,
                                               enable_gqa=self.n_head != Hkv)  # (G, H, 1, D)
            out[lo:hi] = y[:, :, 0]
        return out

    def _prefill_sdpa(self, q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, b: _Batch) -> torch.Tensor:
        """q (T_prefill, H, D) -> (T_prefill, H, D), SDPA per sequence over its packed context."""
        out = torch.empty_like(q)
        for q0, q1, k0, k1 in b.prefill_spans:
            n, ctx = q1 - q0, k1 - k0
            qs = q[q0:q1].transpose(0, 1)[None]  # (1, H, n, D)
            ks = k_ctx[k0:k1].transpose(0, 1)[None]  # (1, Hkv, ctx, D)
            vs = v_ctx[k0:k1].transpose(0, 1)[None]
            if n == ctx:
                y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
            else:
                # the n new tokens are the last n of the context: causal mask aligned bottom-right
                rows = torch.arange(n, device=q.device)[:, None] + (ctx - n)
                mask = torch.arange(ctx, device=q.device)[None, :] <= rows  # (n, ctx)
                y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
            out[q0:q1] = y[0].transpose(0, 1)
        return out

    def _prepare(self, seqs: list[SeqInput]) -> _Batch:
        bs = self.block_size
        decode = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1]
        prefill = [i for i, s in enumerate(seqs) if len(s.token_ids) > 1]
        if self.attention == "torch":
            decode.sort(key=lambda i: seqs[i].start)  # similar context lengths side by side
        order = decode + prefill
        ids: list[int] = []
        row_of = {}
        for i in order:
            ids.extend(seqs[i].token_ids)
            row_of[i] = len(ids) - 1
        positions = np.concatenate([np.arange(seqs[i].start, seqs[i].start + len(seqs[i].token_ids)) for i in order])
        slots = np.concatenate([_slots(seqs[i].block_table, seqs[i].start, seqs[i].start + len(seqs[i].token_ids), bs)
                                for i in order])
        logits_rows = [row_of[i] for i, s in enumerate(seqs) if s.sample]

        block_tables = context_lens = None
        groups = []
        if decode and self.attention == "paged":
            block_tables = self._tensor(_pad_tables([seqs[i].block_table for i in decode]), torch.int32)
            context_lens = self._tensor([seqs[i].start + 1 for i in decode], torch.int32)
        elif decode:
            for lo in range(0, len(decode), DECODE_GROUP):
                members = [seqs[i] for i in decode[lo:lo + DECODE_GROUP]]
                lens = np.array([s.start + 1 for s in members])
                tables = _pad_tables([s.block_table for s in members])  # (G, W)
                p = np.arange(tables.shape[1] * bs)
                mask = self._tensor(p[None, :] < lens[:, None], torch.bool)[:, None, None, :]  # (G, 1, 1, W * B)
                groups.append((lo, lo + len(members), self._tensor(tables.reshape(-1)), mask))

        context_slots = cu_q = cu_k = None
        spans, max_q, max_k = [], 0, 0
        if prefill:
            q_off, k_off = [0], [0]
            for i in prefill:
                n, ctx = len(seqs[i].token_ids), seqs[i].start + len(seqs[i].token_ids)
                spans.append((q_off[-1], q_off[-1] + n, k_off[-1], k_off[-1] + ctx))
                q_off.append(q_off[-1] + n)
                k_off.append(k_off[-1] + ctx)
                max_q, max_k = max(max_q, n), max(max_k, ctx)
            context_slots = self._tensor(np.concatenate(
                [_slots(seqs[i].block_table, 0, seqs[i].start + len(seqs[i].token_ids), bs) for i in prefill]))
            cu_q, cu_k = self._tensor(q_off, torch.int32), self._tensor(k_off, torch.int32)

        return _Batch(
            input_ids=self._tensor(ids), positions=self._tensor(positions), slot_mapping=self._tensor(slots),
            logits_rows=self._tensor(logits_rows), num_decode=len(decode), block_tables=block_tables,
            context_lens=context_lens, decode_groups=groups, context_slots=context_slots, cu_q=cu_q, cu_k=cu_k,
            max_q=max_q, max_k=max_k, prefill_spans=spans,
        )

    def _tensor(self, data, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(data)).to(device=self.device, dtype=dtype)


def _slots(block_table: list[int], lo: int, hi: int, block_size: int) -> np.ndarray:
    """Cache slots of tokens ``lo .. hi - 1`` of a sequence: (hi - lo,) int64."""
    p = np.arange(lo, hi)
    return np.asarray(block_table, dtype=np.int64)[p // block_size] * block_size + p % block_size


def _pad_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one (S, max_blocks) int64 array, padded with block 0 (never read unmasked)."""
    out = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)
    for row, t in zip(out, tables):
        row[:len(t)] = t
    return out
