"""Causal self-attention: the backends, the ``Attention`` layer every model family uses, and the
per-step context through which an inference engine takes over that layer.

Each backend maps q (B, T, H, D), k and v (B, T, Hkv, D) to y (B, T, H, D) (FlashAttention's
layout), where H is a multiple of Hkv and query head h reads KV head h // (H // Hkv)
(grouped-query attention). ``sliding_window=W`` lets a query at position p see only keys at
positions k with p - k < W (Hugging Face Mistral's convention); None sees the whole prefix.
Adding a backend is one entry in ``ATTENTION_BACKENDS``; the configs validate against it.
"auto" (the default) is resolved on every call: "flash" for CUDA tensors (when parallax's Triton
kernel runs there, no attention dropout is asked for and no window cuts the sequence), "sdpa"
otherwise; the Triton interpreter that runs the kernel on CPU is for tests, not for CPU training.

One forward for training and serving (vLLM's shape): a model computes q, k, v and calls its
``Attention`` layer. Outside an engine the layer runs the configured backend over the batch.
Inside ``forward_context(ctx)`` the layer hands q, k, v to ``ctx.attend(layer, q, k, v)``
instead: the engine's context writes the new keys and values into its paged cache and attends
over each sequence's cached context (``parallax.inference.attention_metadata``). The model code
is the same in both cases.

Prefix tuning (``parallax.peft.prefix``) sets a layer's ``prefix``: a callable giving P virtual
keys and values (P, Hkv, D) that every query sees ahead of the real tokens, which sit at positions
P, P + 1, ... (Hugging Face PEFT's past_key_values). The layer then attends with
``prefix_attention``; an engine's context reads ``layer.prefix`` itself.

Packed (padding-free) batches: several examples laid back to back in one row, described by
``PackedSegments`` (built once per forward from positions that restart at 0 at each example) and
passed explicitly down to each ``Attention`` layer, so activation-checkpoint recomputation and
ZeRO-3's hooks see it as an ordinary argument. Each example attends only within itself:
``flash_attention_varlen`` on CUDA, a block-diagonal causal mask through SDPA otherwise.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


def causal_mask(T: int, device: torch.device, sliding_window: int | None = None) -> torch.Tensor:
    """(T, T) bool, True where query i may see key j: j <= i, and i - j < sliding_window if set."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    mask = j <= i
    if sliding_window is not None:
        mask &= i - j < sliding_window
    return mask


def _window_cuts(T: int, sliding_window: int | None) -> bool:
    """Whether a window hides anything from a causal sequence of T tokens."""
    return sliding_window is not None and sliding_window < T


def prefixed_causal_mask(num_prefix: int, start: int, n: int, device: torch.device,
                         sliding_window: int | None = None) -> torch.Tensor:
    """(n, num_prefix + start + n) bool: queries at positions num_prefix + start + i over keys at
    positions 0 .. num_prefix + start + n - 1 (the virtual tokens first), causal and windowed."""
    rows = torch.arange(num_prefix + start, num_prefix + start + n, device=device)[:, None]
    cols = torch.arange(num_prefix + start + n, device=device)[None, :]
    mask = cols <= rows
    if sliding_window is not None:
        mask &= rows - cols < sliding_window
    return mask


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
                     v_prefix: torch.Tensor, dropout_p: float = 0.0, sliding_window: int | None = None,
                     segments: PackedSegments | None = None) -> torch.Tensor:
    """Causal attention whose keys and values start with P virtual tokens seen by every query.

    q (B, T, H, D), k/v (B, T, Hkv, D), k_prefix/v_prefix (P, Hkv, D) -> (B, T, H, D). The real
    tokens sit at positions P .. P + T - 1, so a window counts the virtual tokens too. With
    ``segments`` (a packed batch) every example sees the virtual tokens and then only itself, its
    tokens at positions P, P + 1, ... as if it were alone.
    """
    B, T = q.shape[:2]
    P = k_prefix.size(0)
    k = torch.cat([k_prefix.to(k.dtype).expand(B, *k_prefix.shape), k], dim=1)  # (B, P + T, Hkv, D)
    v = torch.cat([v_prefix.to(v.dtype).expand(B, *v_prefix.shape), v], dim=1)
    if segments is None:
        mask = prefixed_causal_mask(P, 0, T, q.device, sliding_window)  # (T, P + T)
    else:
        mask = _packed_prefix_mask(segments, P, sliding_window)  # (B, 1, T, P + T)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       dropout_p=dropout_p, enable_gqa=q.size(2) != k.size(2))  # (B, H, T, D)
    return y.transpose(1, 2)


def _packed_prefix_mask(segments: PackedSegments, num_prefix: int, sliding_window: int | None) -> torch.Tensor:
    """(B, 1, T, P + T) bool: each query sees the P virtual tokens (within the window, counted from
    its position P + p in its example) and then the causal part of its own example."""
    B, T = segments.segment_ids.shape
    flat = torch.arange(B * T, device=segments.segment_ids.device).view(B, T)
    in_example = flat - segments.cu_seqlens.long()[segments.segment_ids]  # (B, T): p of each token
    visible = torch.ones(B, T, num_prefix, dtype=torch.bool, device=flat.device)
    if sliding_window is not None:
        cols = torch.arange(num_prefix, device=flat.device)
        visible = (num_prefix + in_example)[:, :, None] - cols < sliding_window
    return torch.cat([visible[:, None], segments.mask(sliding_window)], dim=-1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(D)) v with a causal (and window) mask; the readable reference.

    q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).
    """
    T, D = q.size(1), q.size(-1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    group = q.size(1) // k.size(1)
    if group > 1:
        # Each KV head serves `group` consecutive query heads.
        k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(group, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, T)
    att = att.masked_fill(~causal_mask(T, q.device, sliding_window), float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v).transpose(1, 2)  # (B, T, H, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   sliding_window: int | None = None) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

    q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D). A window that cuts the sequence becomes
    an explicit mask (SDPA's causal flag has no window).
    """
    T = q.size(1)
    mask = causal_mask(T, q.device, sliding_window) if _window_cuts(T, sliding_window) else None
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       dropout_p=dropout_p, is_causal=mask is None,
                                       enable_gqa=q.size(2) != k.size(2))  # (B, H, T, D)
    return y.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    sliding_window: int | None = None) -> torch.Tensor:
    """parallax's Triton FlashAttention kernel (``parallax.ops.flash_attention``); no attention
    dropout and no sliding window shorter than the sequence.

    q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D). D must be a multiple of 8 up to 256.
    """
    if dropout_p > 0.0:
        raise ValueError(f"the 'flash' attention backend has no attention dropout (dropout_p={dropout_p}); "
                         "use attention='sdpa' or 'math', or dropout=0.0")
    if _window_cuts(q.size(1), sliding_window):
        raise ValueError(f"the 'flash' attention backend has no sliding window (sliding_window={sliding_window} "
                         f"< sequence length {q.size(1)}); use attention='sdpa' or 'math'")
    from parallax.ops.flash_attention import flash_attention as flash

    return flash(q, k, v, causal=True)


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   sliding_window: int | None = None) -> torch.Tensor:
    """"flash" for CUDA tensors when the Triton kernel runs there, takes this head size, no
    attention dropout is asked for and no window cuts the sequence; "sdpa" otherwise."""
    if q.is_cuda and dropout_p == 0.0 and not _window_cuts(q.size(1), sliding_window) and _flash_runs(q):
        return flash_attention(q, k, v)
    return sdpa_attention(q, k, v, dropout_p, sliding_window)


def _flash_runs(q: torch.Tensor) -> bool:
    from parallax.ops.flash_attention import SUPPORTED_HEAD_DIMS, backend

    return q.size(-1) in SUPPORTED_HEAD_DIMS and backend(q.device) == "triton"


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "int | None"], torch.Tensor]

ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "math": math_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "auto": auto_attention,
}


PrefixFn = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PackedSegments:
    """The examples packed into a batch: token t of row b belongs to example ``segment_ids[b, t]``.

    ``cu_seqlens`` (S + 1,) int32 holds the start offsets of the S examples in the flattened
    (B * T) token order and ends with B * T (FlashAttention's varlen layout); ``max_seqlen`` is the
    longest example. An example never spans two rows.
    """

    segment_ids: torch.Tensor  # (B, T) int64, increasing across the flattened batch
    cu_seqlens: torch.Tensor  # (S + 1,) int32
    max_seqlen: int
    # sliding_window -> mask: built by the first layer that needs it, shared by the others and by
    # the activation-checkpoint recomputes (which get this same object as an argument).
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_positions(cls, positions: torch.Tensor) -> "PackedSegments":
        """Segments of positions (B, T) that count 0, 1, 2, ... within each example: an example
        starts wherever the position is 0 (and at every row's start). Hugging Face's padding-free
        ``DataCollatorWithFlattening`` marks examples the same way."""
        if positions.dim() != 2:
            raise ValueError(f"positions must have shape (B, T); got {tuple(positions.shape)}")
        starts = positions == 0
        starts[:, 0] = True
        continues = positions[:, 1:] == positions[:, :-1] + 1
        bad = (~(starts[:, 1:] | continues)).nonzero()
        if bad.numel():
            b, t = bad[0].tolist()
            raise ValueError("packed positions must restart at 0 at each example and count up by 1 within it; "
                             f"positions[{b}, {t}:{t + 2}] = {positions[b, t:t + 2].tolist()}")
        flat_starts = starts.reshape(-1)
        segment_ids = (torch.cumsum(flat_starts, 0) - 1).view_as(positions)
        total = torch.tensor([flat_starts.numel()], device=positions.device)
        offsets = torch.cat([flat_starts.nonzero().squeeze(1), total])
        cu_seqlens = offsets.to(torch.int32)
        return cls(segment_ids, cu_seqlens, int((offsets[1:] - offsets[:-1]).max()))

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query i may see key j: the same example, j <= i, and
        i - j < sliding_window if set (a window counts within the example)."""
        if sliding_window not in self._masks:
            T = self.segment_ids.size(1)
            same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]  # (B, T, T)
            self._masks[sliding_window] = (same & causal_mask(T, same.device, sliding_window))[:, None]
        return self._masks[sliding_window]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, backend: str,
                     dropout_p: float = 0.0, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention within each packed example: q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).

    ``flash_attention_varlen`` for CUDA tensors under the "flash" backend (or "auto" where the
    kernel runs, no dropout is asked for and no window cuts an example); otherwise SDPA with the
    block-diagonal causal mask of ``segments`` (the window, if any, applied within each example).
    """
    B, T, H, D = q.shape
    use_flash = backend == "flash" or (
        backend == "auto" and q.is_cuda and dropout_p == 0.0
        and not _window_cuts(segments.max_seqlen, sliding_window) and _flash_runs(q))
    if use_flash:
        if dropout_p > 0.0 or _window_cuts(segments.max_seqlen, sliding_window):
            raise ValueError("the 'flash' attention backend has no attention dropout or sliding window "
                             f"(dropout_p={dropout_p}, sliding_window={sliding_window}); use attention='sdpa'")
        from parallax.ops.flash_attention import flash_attention_varlen

        cu, n = segments.cu_seqlens, segments.max_seqlen
        flat = (t.reshape(B * T, t.size(2), D) for t in (q, k, v))
        return flash_attention_varlen(*flat, cu, cu, n, n, causal=True).view(B, T, H, D)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=segments.mask(sliding_window), dropout_p=dropout_p,
                                       enable_gqa=H != k.size(2))  # (B, H, T, D)
    return y.transpose(1, 2)


class AttentionContext(Protocol):
    """What an engine provides for one step: ``attend`` replaces the layer's backend."""

    def attend(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, Hkv, D) of this step's new tokens -> (B, T, H, D)."""
        ...


_local = threading.local()


@contextmanager
def forward_context(ctx: AttentionContext) -> Iterator[None]:
    """Within this block (on this thread) every ``Attention`` layer calls ``ctx.attend``."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield
    finally:
        _local.ctx = previous


def get_forward_context() -> AttentionContext | None:
    """The context set by ``forward_context`` on this thread, or None (training, plain forward)."""
    return getattr(_local, "ctx", None)


class Attention(nn.Module):
    """Causal attention over projected q, k, v; no parameters.

    Every model family calls this layer, so ZeRO, checkpointing and the inference engine see one
    attention contract. ``n_head``, ``n_kv_head``, ``head_dim`` and ``sliding_window`` describe
    the layer to an engine (cache shapes, masks). ``prefix``, when set (prefix tuning), returns
    this layer's virtual keys and values (P, Hkv, D); it is a plain callable, not a submodule, so
    the parameters behind it stay in one place of the state dict.
    """

    def __init__(self, backend: str, n_head: int, n_kv_head: int, head_dim: int, dropout: float = 0.0,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_BACKENDS)}; got {backend!r}")
        self.backend = backend
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.dropout = dropout
        self.sliding_window = sliding_window
        self.prefix: PrefixFn | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                segments: PackedSegments | None = None) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D); with ``segments`` each packed
        example attends only within itself."""
        ctx = get_forward_context()
        if ctx is not None:
            return ctx.attend(self, q, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.prefix is not None:
            k_prefix, v_prefix = self.prefix()
            return prefix_attention(q, k, v, k_prefix, v_prefix, dropout_p, self.sliding_window, segments)
        if segments is not None:
            return packed_attention(q, k, v, segments, self.backend, dropout_p, self.sliding_window)
        return ATTENTION_BACKENDS[self.backend](q, k, v, dropout_p, self.sliding_window)

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window is not None else ""
        prefix = ", prefix" if self.prefix is not None else ""
        return (f"{self.backend}, heads={self.n_head}, kv_heads={self.n_kv_head}, head_dim={self.head_dim}"
                f"{window}{prefix}")


def attention_layers(model: nn.Module, needed_by: str = "this", per_use: bool = False) -> list[Attention]:
    """The model's ``Attention`` layers in module order; ValueError (naming ``needed_by``) if it has
    none or they differ in KV heads or head size (one cache or prefix table serves them all).
    ``per_use``: a layer that the model holds at several positions (cross-layer sharing) is listed
    at each, as many times as a forward calls it (an engine keeps one KV cache per call)."""
    modules = (m for _, m in model.named_modules(remove_duplicate=False)) if per_use else model.modules()
    layers = [m for m in modules if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no parallax.models.Attention layers; {needed_by} needs a "
                         "parallax model family (parallax.models.from_preset / from_hf)")
    shapes = {(layer.n_kv_head, layer.head_dim) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(f"attention layers differ in (KV heads, head size): {sorted(shapes)}; {needed_by} needs "
                         "one shape")
    return layers
