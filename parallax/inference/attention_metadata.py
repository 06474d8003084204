"""Per-step attention metadata and the paged attention that the model's own ``Attention`` layers
run while the engine's forward context is active (vLLM's shape: the model is unchanged, its
attention layer reads this step's metadata).

A step computes T new tokens of S sequences side by side (no padding): sequences computing one
token (decodes) first, then those computing several (prefills: prompts, prompt chunks,
recomputation after preemption). In every attention layer the new tokens' K/V are written into
the paged cache (``reshape_and_cache``), then each token attends over its sequence's context:

* ``"paged"`` (CUDA): decodes with ``parallax.ops.paged_attention``; prefills (and decodes when a
  sliding window cuts the context) with ``parallax.ops.paged_attention_varlen``, which reads K/V
  from the cache blocks through the block tables: the context is never copied out.
* ``"torch"`` (CPU): decodes with the compiled CPU kernel of ``parallax.ops.paged_attention``
  when ``parallax._C`` has it (K/V read in place through the block tables, each row once), unless
  the layer has prefix-tuning virtual tokens or a sliding window that cuts a context; otherwise
  (and without the kernel) decodes attend over their gathered blocks with SDPA (sequences sorted
  by context length and grouped, so little padding is read). A prefill with nothing cached
  before it attends over its own fresh K/V (no cache read), one with a cached prefix over its
  own blocks (``paged_attention_varlen``'s reference).

A prefix-tuned model (``Attention.prefix`` set) is served by the ``"torch"`` path: each sequence
attends over the layer's P virtual keys and values ahead of its cached context (they are not in
the cache; the model has already shifted the real tokens' rotary positions by P).

Shapes: T tokens this step, H query heads, Hkv KV heads, D head size, N blocks of B slots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from parallax import ops
from parallax.models.attention import Attention, causal_mask, prefixed_causal_mask
from parallax.ops.paged_attention import BLOCK_SIZES as PAGED_BLOCK_SIZES
from parallax.ops.paged_attention import DTYPES as PAGED_DTYPES
from parallax.ops.paged_attention import HEAD_DIMS as PAGED_HEAD_DIMS

__all__ = ["SeqInput", "StepMetadata", "PagedAttentionContext", "build_metadata", "cpu_decode_kernel"]

# Decode sequences attended together by the "torch" gather path (sorted by context length, so a
# group's padding is small).
DECODE_GROUP = 16


def cpu_decode_kernel(device: torch.device, block_size: int) -> bool:
    """True when "torch" decodes on ``device`` can run the compiled CPU ``paged_attention`` kernel
    (which also needs one of its head sizes and dtypes: checked per layer).
    (The CPU serving model of ``bench serve --http``, in-process engine, 2 cores: median step at
    batch 64 / 128 / 256 from ~44 / 50 / 81 ms with gather + SDPA to 19 / 35 / 62 ms.)"""
    return (device.type == "cpu" and block_size in PAGED_BLOCK_SIZES
            and ops.backend("paged_attention", device) == "cpu")


@dataclass
class SeqInput:
    """One sequence's part of a step: compute ``token_ids`` at positions ``start, start + 1, ...``
    with the blocks of ``block_table``; ``sample`` asks for the logits after the last one."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool


@dataclass
class StepMetadata:
    """The tensors of one step (decodes first, then prefills)."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each token
    logits_rows: torch.Tensor  # (S_sample,) int64: the rows whose logits are returned, in input order
    num_decode: int
    max_context: int  # longest context of any sequence this step
    # "paged": per sequence, decodes then prefills; "torch" with the CPU decode kernel: the decodes only
    block_tables: torch.Tensor | None  # (S, max_blocks) int32
    context_lens: torch.Tensor | None  # (S,) int32, new tokens included
    cu_seqlens_q: torch.Tensor | None  # (S + 1,) int32, offsets of each sequence's new tokens
    max_query: int
    # "torch" decode rows: block tables (S_decode, W) int64 padded with block 0, context lengths (S_decode,)
    decode_tables: np.ndarray | None
    decode_lens: np.ndarray | None
    # "torch" prefill: (first row, last row + 1, start position, block ids (W,) int64) per sequence
    prefill_spans: list[tuple[int, int, int, torch.Tensor]]
    order: list[int]  # rows hold seqs[order[0]]'s tokens, then seqs[order[1]]'s, ...
    block_size: int

    @functools.cached_property
    def decode_groups(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The "torch" gather path's decode groups, built on first use (the CPU kernel needs none):
        (first row, last row + 1, block ids (G * W,) int64, context lengths (G,) int64), W the
        blocks of the group's longest context."""
        device = self.input_ids.device
        groups = []
        for lo in range(0, self.num_decode, DECODE_GROUP):
            hi = min(lo + DECODE_GROUP, self.num_decode)
            lens = self.decode_lens[lo:hi]
            width = -(-int(lens.max()) // self.block_size)
            blocks = np.ascontiguousarray(self.decode_tables[lo:hi, :width]).reshape(-1)
            groups.append((lo, hi, torch.as_tensor(blocks).to(device), torch.as_tensor(lens).to(device)))
        return groups


def build_metadata(seqs: list[SeqInput], block_size: int, implementation: str,
                   device: torch.device) -> StepMetadata:
    """The step's tensors for ``implementation`` ("paged" or "torch"), on ``device``."""

    def tensor(data, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(data)).to(device=device, dtype=dtype)

    decode = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1]
    prefill = [i for i, s in enumerate(seqs) if len(s.token_ids) > 1]
    if implementation == "torch":
        decode.sort(key=lambda i: seqs[i].start)  # similar context lengths side by side
    order = decode + prefill
    ids: list[int] = []
    row_of = {}
    for i in order:
        ids.extend(seqs[i].token_ids)
        row_of[i] = len(ids) - 1
    ends = [seqs[i].start + len(seqs[i].token_ids) for i in order]
    positions = np.concatenate([np.arange(seqs[i].start, end) for i, end in zip(order, ends)])
    slots = np.concatenate([_slots(seqs[i].block_table, seqs[i].start, end, block_size)
                            for i, end in zip(order, ends)])
    logits_rows = [row_of[i] for i, s in enumerate(seqs) if s.sample]

    block_tables = context_lens = cu_q = decode_tables = decode_lens = None
    spans = []
    if implementation == "paged":
        block_tables = tensor(_pad_tables([seqs[i].block_table for i in order]), torch.int32)
        context_lens = tensor(ends, torch.int32)
        cu_q = tensor(np.cumsum([0] + [len(seqs[i].token_ids) for i in order]), torch.int32)
    else:
        if decode:
            decode_tables = _pad_tables([seqs[i].block_table for i in decode])
            decode_lens = np.asarray(ends[:len(decode)], dtype=np.int64)
            if cpu_decode_kernel(device, block_size):
                block_tables = tensor(decode_tables, torch.int32)
                context_lens = tensor(decode_lens, torch.int32)
        row = len(decode)
        for i in prefill:
            s = seqs[i]
            n = len(s.token_ids)
            used = -(-(s.start + n) // block_size)  # blocks holding this sequence's context
            spans.append((row, row + n, s.start, tensor(s.block_table[:used])))
            row += n
    return StepMetadata(
        input_ids=tensor(ids), positions=tensor(positions), slot_mapping=tensor(slots),
        logits_rows=tensor(logits_rows), num_decode=len(decode), max_context=max(ends),
        block_tables=block_tables, context_lens=context_lens, cu_seqlens_q=cu_q,
        max_query=max(len(s.token_ids) for s in seqs), decode_tables=decode_tables, decode_lens=decode_lens,
        prefill_spans=spans, order=order, block_size=block_size,
    )


class PagedAttentionContext:
    """The forward context of one engine step: every ``Attention`` layer of the model writes its
    new K/V into its cache and attends over the paged context (see the module docstring).

    kv_cache: (2, L, N, B, Hkv, D), one (keys, values) pair per attention layer in ``layers`` order;
    a layer listed at several positions (cross-layer sharing: one module called at each) uses the
    pair of its n-th position on its n-th call of the step.
    """

    def __init__(self, kv_cache: torch.Tensor, layers: list[Attention], implementation: str,
                 metadata: StepMetadata) -> None:
        self.kv_cache = kv_cache
        self.layer_index: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            self.layer_index.setdefault(id(layer), []).append(i)
        self._calls: dict[int, int] = {}  # calls of each layer in this step so far
        self.implementation = implementation
        self.meta = metadata

    def _cache_index(self, layer: Attention) -> int:
        uses = self.layer_index[id(layer)]
        call = self._calls.get(id(layer), 0)
        self._calls[id(layer)] = call + 1
        return uses[call % len(uses)]

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, T, H, D), k/v (1, T, Hkv, D) of this step's new tokens -> (1, T, H, D)."""
        i = self._cache_index(layer)
        k_cache, v_cache = self.kv_cache[0, i], self.kv_cache[1, i]  # (N, B, Hkv, D) each
        q, k, v = q[0], k[0], v[0]
        m = self.meta
        paged = self.implementation == "paged"
        # "torch" pins the reference write: on CPU the default may be the Triton interpreter (for tests)
        ops.reshape_and_cache(k, v, k_cache, v_cache, m.slot_mapping, backend=None if paged else "reference")
        prefix = _layer_prefix(layer, k_cache.dtype)
        if paged:
            if prefix is not None:
                raise ValueError("the 'paged' attention kernels take no prefix-tuning virtual tokens; "
                                 "serve a prefix-tuned model with attention='torch'")
            y = self._paged(layer, q, k_cache, v_cache)
        else:
            y = torch.empty_like(q)
            if m.num_decode:
                y[:m.num_decode] = self._decode(layer, q[:m.num_decode], k_cache, v_cache, prefix)
            for lo, hi, start, blocks in m.prefill_spans:
                y[lo:hi] = self._prefill(layer, q[lo:hi], k[lo:hi], v[lo:hi], start, blocks, k_cache, v_cache,
                                         prefix)
        return y[None]

    def _paged(self, layer: Attention, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The CUDA path: q (T, H, D) -> (T, H, D), K/V read from the cache blocks by the kernels."""
        m = self.meta
        window = layer.sliding_window
        nd = m.num_decode if window is None or window >= m.max_context else 0
        y = torch.empty_like(q)
        if nd:
            y[:nd] = ops.paged_attention(q[:nd].contiguous(), k_cache, v_cache, m.block_tables[:nd],
                                         m.context_lens[:nd])
        if nd < q.size(0):
            cu = m.cu_seqlens_q[nd:] - m.cu_seqlens_q[nd]
            y[nd:] = ops.paged_attention_varlen(q[nd:], k_cache, v_cache, m.block_tables[nd:], cu,
                                                m.context_lens[nd:], m.max_query, sliding_window=window)
        return y

    def _decode(self, layer: Attention, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The "torch" path's decodes q (S, H, D) -> (S, H, D): the CPU kernel reading the cache in
        place when the step built its tables and nothing but the cached context is attended to."""
        m = self.meta
        window = layer.sliding_window
        takes = q.size(-1) in PAGED_HEAD_DIMS and q.dtype in PAGED_DTYPES
        if (m.block_tables is None or not takes or prefix is not None
                or (window is not None and window < m.max_context)):
            return self._decode_gather(layer, q, k_cache, v_cache, prefix)
        # validate=False: the tables were built from the block manager's, and the kernel never
        # reads a block outside the cache anyway (the host check would cost a few ops per layer)
        return ops.paged_attention(q, k_cache, v_cache, m.block_tables, m.context_lens, backend="cpu", validate=False)

    def _decode_gather(self, layer: Attention, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q (S, H, D), one token per sequence -> (S, H, D), attending over gathered cache blocks
        (after the layer's virtual keys/values (P, Hkv, D) when ``prefix`` is given)."""
        _, B, Hkv, D = k_cache.shape
        out = torch.empty_like(q)
        for lo, hi, blocks, lens in self.meta.decode_groups:
            G = hi - lo
            # whole blocks (B x Hkv x D contiguous values each) gather faster than single slots
            k = k_cache.index_select(0, blocks).view(G, -1, Hkv, D).transpose(1, 2)  # (G, Hkv, L, D)
            v = v_cache.index_select(0, blocks).view(G, -1, Hkv, D).transpose(1, 2)
            p = torch.arange(k.size(2), device=q.device)[None, :]
            mask = p < lens[:, None]  # (G, L)
            if layer.sliding_window is not None:
                mask &= p >= lens[:, None] - layer.sliding_window
            if prefix is not None:
                k, v, mask = _prepend_prefix(k, v, mask, prefix, lens, layer.sliding_window)
            y = F.scaled_dot_product_attention(q[lo:hi, :, None], k, v, attn_mask=mask[:, None, None, :],
                                               enable_gqa=q.size(1) != Hkv)  # (G, H, 1, D)
            out[lo:hi] = y[:, :, 0]
        return out

    def _prefill(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                 blocks: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One sequence's n new tokens q (n, H, D) at positions start .. start + n - 1 -> (n, H, D)
        (after the layer's virtual keys/values (P, Hkv, D) when ``prefix`` is given)."""
        n, H, D = q.shape
        Hkv = k.size(1)
        if start > 0:  # a cached prefix: attend over this sequence's own blocks
            k = k_cache.index_select(0, blocks).view(-1, Hkv, D)[:start + n]  # (ctx, Hkv, D)
            v = v_cache.index_select(0, blocks).view(-1, Hkv, D)[:start + n]
        window = layer.sliding_window
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix[0].size(0)
            k, v = torch.cat([prefix[0], k]), torch.cat([prefix[1], v])  # (P + ctx, Hkv, D)
        if start == 0 and num_prefix == 0:  # the causal flag picks SDPA's fused kernels; a cutting window needs a mask
            mask = causal_mask(n, q.device, window) if window is not None and window < n else None
        else:
            mask = prefixed_causal_mask(num_prefix, start, n, q.device, window)  # (n, P + start + n)
        y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=H != Hkv)  # (1, H, n, D)
        return y[0].transpose(0, 1)


def _layer_prefix(layer: Attention, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's prefix-tuning virtual keys and values (P, Hkv, D) in the cache's dtype, or None."""
    if layer.prefix is None:
        return None
    k_prefix, v_prefix = layer.prefix()
    return k_prefix.to(dtype), v_prefix.to(dtype)


def _prepend_prefix(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor],
                    lens: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gathered decode keys/values k, v (G, Hkv, L, D) and their mask (G, L) with the P virtual
    tokens in front: (G, Hkv, P + L, D) and (G, P + L). A decode query sits at position P + lens - 1
    and virtual token j at position j, so a window hides j when P + lens - 1 - j >= window."""
    G, P = k.size(0), prefix[0].size(0)
    k_prefix, v_prefix = (t.transpose(0, 1)[None].expand(G, -1, -1, -1) for t in prefix)  # (G, Hkv, P, D)
    seen = torch.ones(G, P, dtype=torch.bool, device=mask.device)
    if window is not None:
        j = torch.arange(P, device=mask.device)[None, :]
        seen &= P + lens[:, None] - 1 - j < window
    return torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2), torch.cat([seen, mask], dim=1)


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
