"""FlashAttention (forward and backward as Triton kernels): launchers, checks, autograd, reference.

``flash_attention(q, k, v)`` computes softmax(q k^T * softmax_scale) v without materialising the
S_q x S_k score matrix: q (B, S_q, H, D), k and v (B, S_k, H_kv, D) -> (B, S_q, H, D), the
layout of FlashAttention. ``flash_attention_varlen`` does the same for packed sequences.

Semantics:

* **Causal mask, bottom-right aligned** (as FlashAttention >= 2.1): query i attends key j when
  j <= i + S_k - S_q. With S_q == S_k this is the usual lower triangle; with S_q < S_k (decode
  with a KV cache) the last query sees every key. With S_q > S_k the first S_q - S_k queries
  attend to nothing: their output is 0, their log-sum-exp is -inf (the log-sum-exp of an empty
  set) and they pass no gradient to anything.
* **GQA/MQA**: H must be a multiple of H_kv; query head h reads KV head h // (H // H_kv).
* **Head dims**: every multiple of 8 from 8 to 256 (a non-power-of-two D is padded to the next
  power of two inside the kernel, with masked loads; callers pad nothing).
* **Dtypes**: fp16, bf16 and fp32 inputs (all three alike); scores, softmax statistics and
  accumulators are fp32. fp32 inputs multiply in full fp32 (no TF32).
* **Any sequence lengths**, no padding by the caller (masked loads and stores).
* **Non-contiguous inputs** are read through their strides, never copied (transposed views,
  slices of a fused QKV projection, broadcast batch dims). Outputs and gradients are contiguous.
* **Deterministic backward, always**: dk/dv of a key block are accumulated by one program that
  walks every query head of its group, dq by a separate kernel pass; no atomics, so two runs
  give bitwise equal gradients.
* No dropout, no attention bias, no sliding window.

Dispatch (``parallax.ops.backend("flash_attention", device)``): CUDA tensors -> the compiled
Triton kernels ('triton'); CPU tensors -> the same kernels under Triton's interpreter when
``TRITON_INTERPRET=1`` is set ('triton'; that is how CI tests them; set it before the first
call), else ``flash_attention_ref`` in plain PyTorch ('reference').

On CUDA the kernels are autotuned per (head dim, causal, varlen, dtype) over a few H100-class
configurations, on the shapes of the first call of each; ``PARALLAX_FLASH_AUTOTUNE=0`` uses the
first configuration that fits instead (no benchmarking on first use; what the tests do to keep
compile time down). fp32 inputs (exact FMA products, no tensor cores: a correctness path) run one
small configuration.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

Tensor = torch.Tensor

__all__ = [
    "flash_attention", "flash_attention_ref", "flash_attention_varlen", "flash_attention_varlen_ref",
    "backend", "SUPPORTED_HEAD_DIMS", "KERNEL_DTYPES",
]

SUPPORTED_HEAD_DIMS = tuple(range(8, 257, 8))
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------------
# dispatch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``flash_attention`` (and ``flash_attention_varlen``) uses for tensors on
    ``device``: 'triton' (compiled on CUDA; interpreted on CPU under ``TRITON_INTERPRET=1``) or
    'reference' (plain PyTorch)."""
    device_type = torch.device(device).type
    if device_type == "cuda" and _triton_importable():
        return "triton"
    if device_type == "cpu" and _interpreting() and _triton_importable():
        return "triton"
    return "reference"


def _kernels() -> ModuleType:
    """The kernel module, imported on first use (``triton.jit`` reads TRITON_INTERPRET at import)."""
    from parallax.kernels import flash_attention as kernels

    if _interpreting() and not _is_interpreted(kernels._attn_fwd):
        raise RuntimeError(
            "flash_attention: TRITON_INTERPRET=1 was set after parallax.kernels.flash_attention had been "
            "imported for compiled use; set it before the first flash_attention call in this process"
        )
    return kernels


def _is_interpreted(fn: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(fn, InterpretedFunction)


def _autotune() -> bool:
    return os.environ.get("PARALLAX_FLASH_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


# --------------------------------------------------------------------------------------------
# checks


def _head_dim_error(name: str, head_dim: int) -> ValueError:
    return ValueError(
        f"{name}: head dim D={head_dim} is not supported; supported head dims are the multiples of 8 "
        f"from 8 to 256 ({', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
    )


def _check(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str) -> None:
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name}: {arg} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    for arg, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: {arg} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: k has batch size {k.shape[0]} but q has {q.shape[0]}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"{name}: q has {heads} heads, which is not a multiple of the {kv_heads} heads of k and v "
                         "(H must be a multiple of H_kv)")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: k has head dim {k.shape[-1]} but q has {q.shape[-1]}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise _head_dim_error(name, q.shape[-1])


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale}")
    return softmax_scale


# --------------------------------------------------------------------------------------------
# launchers (all tensors 4-D (B, S, H, D); varlen: B == 1 and cu_seqlens give the sequences)


def _strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """Strides in elements; the batch stride is 0 where there is one batch entry (packed varlen
    sequences, or B == 1), which the kernels never step over: one compiled variant for all such
    shapes instead of one per divisibility of S * H * D."""
    sb, ss, sh, sd = t.stride()
    return (0 if varlen or t.shape[0] == 1 else sb), ss, sh, sd


def _block_d(head_dim: int) -> int:
    """The kernels' padded head dim: the next power of two, at least 16 (the smallest tl.dot)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(kernels: ModuleType, name: str, tuned: Any, plain: Any, grid: Callable[[dict], tuple[int, int, int]],
            args: tuple, meta: dict, q: Tensor) -> None:
    """Run ``plain`` with the interpreter's fixed blocks, ``tuned`` (autotuned) on CUDA, or ``plain``
    with the default CUDA configuration when autotuning is off."""
    if _is_interpreted(plain):
        blocks = kernels.INTERPRETER_BLOCKS[name]
        plain[grid(blocks)](*args, **meta, **blocks)
    elif _autotune() and tuned is not None:
        tuned[grid](*args, **meta)
    else:
        cfg = kernels.default_config(name, meta["BLOCK_D"], q.element_size())
        plain[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit operands


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cu_q: Tensor | None,
             cu_k: Tensor | None, max_q: int, max_k: int) -> tuple[Tensor, Tensor]:
    """o (B, S_q, H, D) and lse (B, H, S_q) fp32 of q (B, S_q, H, D), k/v (B, S_k, H_kv, D);
    varlen: B == 1 and cu_q/cu_k (batch + 1,) int32 give the packed sequences."""
    kernels = _kernels()
    varlen = cu_q is not None
    B, S_q, H, D = q.shape
    S_k, H_kv = k.shape[1], k.shape[2]
    n_seq = cu_q.numel() - 1 if varlen else B
    # packed batches may hold tokens past the last sequence, which no program writes
    o = (torch.zeros if varlen else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or n_seq == 0:
        return o, lse.fill_(float("-inf"))
    stride_lb, stride_lh = (0 if varlen else H * S_q), S_q
    args = (q, k, v, o, lse, cu_q if varlen else lse, cu_k if varlen else lse, scale * _LOG2E,
            *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(o, varlen),
            stride_lb, stride_lh, S_q, S_k, H // H_kv)
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), IS_CAUSAL=causal, VARLEN=varlen,
                DOT_PRECISION=_dot_precision(q.dtype))
    grid = lambda m: (_cdiv(max_q, m["BLOCK_M"]), n_seq, H)  # noqa: E731
    _launch(kernels, "fwd", kernels._attn_fwd_tuned, kernels._attn_fwd, grid, args, meta, q)
    return o, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float,
              cu_q: Tensor | None, cu_k: Tensor | None, max_q: int, max_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, S_q, H, D), dk and dv (B, S_k, H_kv, D) from do (B, S_q, H, D) and the forward's o, lse."""
    kernels = _kernels()
    varlen = cu_q is not None
    B, S_q, H, D = q.shape
    S_k, H_kv = k.shape[1], k.shape[2]
    n_seq = cu_q.numel() - 1 if varlen else B
    # packed batches may hold tokens past the last sequence, which no program writes
    new = torch.zeros if varlen or k.shape[1] == 0 else torch.empty
    dq = new(q.shape, dtype=q.dtype, device=q.device)
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    if n_seq == 0 or dq.numel() == 0 or dk.numel() == 0:
        return dq, dk, dv
    cu_q_arg, cu_k_arg = (cu_q, cu_k) if varlen else (lse, lse)
    block_d = _block_d(D)
    stride_lb, stride_lh = (0 if varlen else H * S_q), S_q

    # delta = rowsum(o * do)
    delta = torch.empty_like(lse)
    pre_blocks = kernels.INTERPRETER_BLOCKS["preprocess"] if _is_interpreted(kernels._attn_fwd) else dict(BLOCK_M=64)
    kernels._attn_bwd_preprocess[(_cdiv(max_q, pre_blocks["BLOCK_M"]), n_seq, H)](
        o, do, delta, cu_q_arg, *_strides4(o, varlen), *_strides4(do, varlen), stride_lb, stride_lh, S_q,
        HEAD_DIM=D, BLOCK_D=block_d, VARLEN=varlen, **pre_blocks)

    common = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=causal, VARLEN=varlen, DOT_PRECISION=_dot_precision(q.dtype))
    tail = (stride_lb, stride_lh, S_q, S_k, H // H_kv)
    qk_scale = scale * _LOG2E
    # dk, dv: one program per (key block, sequence, KV head)
    args = (q, k, v, do, lse, delta, dk, dv, cu_q_arg, cu_k_arg, qk_scale, scale, *common,
            *_strides4(dk, varlen), *_strides4(dv, varlen), *tail)
    grid = lambda m: (_cdiv(max_k, m["BLOCK_N"]), n_seq, H_kv)  # noqa: E731
    _launch(kernels, "dkdv", kernels._attn_bwd_dkdv_tuned, kernels._attn_bwd_dkdv, grid, args, meta, q)
    # dq: one program per (query block, sequence, query head)
    args = (q, k, v, do, lse, delta, dq, cu_q_arg, cu_k_arg, qk_scale, scale, *common, *_strides4(dq, varlen), *tail)
    grid = lambda m: (_cdiv(max_q, m["BLOCK_M"]), n_seq, H)  # noqa: E731
    _launch(kernels, "dq", kernels._attn_bwd_dq_tuned, kernels._attn_bwd_dq, grid, args, meta, q)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Forward and backward of FlashAttention through the Triton kernels; batched (cu_q None) or
    packed (q, k, v 4-D with batch 1 and cu_seqlens int32 giving the sequences)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cu_q, cu_k, max_q, max_k):
        o, lse = _forward(q, k, v, causal, scale, cu_q, cu_k, max_q, max_k)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.causal, ctx.scale, ctx.max_q, ctx.max_k = causal, scale, max_q, max_k
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, cu_q, cu_k, ctx.max_q, ctx.max_k)
        return dq, dk, dv, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# public functions


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    softmax_scale: float | None = None, return_lse: bool = False):
    """softmax(q k^T * softmax_scale [+ causal mask]) v, differentiable in q, k and v.

    q (B, S_q, H, D); k, v (B, S_k, H_kv, D) with H a multiple of H_kv (GQA/MQA); D a multiple of
    8 in [8, 256]; fp16, bf16 or fp32, all on one device; any strides. Returns out (B, S_q, H, D)
    in q's dtype, and with ``return_lse`` also lse (B, H, S_q) fp32, the natural-log log-sum-exp
    of each row's scaled scores (not differentiable).

    ``softmax_scale`` defaults to 1/sqrt(D). With ``causal`` the mask is aligned to the
    bottom-right corner, as in FlashAttention >= 2.1: query i attends key j when
    j <= i + S_k - S_q; a query that attends to no key (only when S_q > S_k) outputs 0, has
    lse -inf and gets (and gives) zero gradient. The backward is always deterministic.
    """
    _check("flash_attention", q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    scale = _scale(softmax_scale, q.shape[-1])
    if backend(q.device) == "reference":
        return flash_attention_ref(q, k, v, causal=causal, softmax_scale=scale, return_lse=return_lse)
    o, lse = _FlashAttention.apply(q, k, v, bool(causal), scale, None, None, q.shape[1], k.shape[1])
    return (o, lse) if return_lse else o


def _check_cu(name: str, arg: str, cu: torch.Tensor, device: torch.device, total: int, max_seqlen: int) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        what = f"{cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name}: {arg} must be a 1-D int32 tensor of batch + 1 offsets, got a {what}")
    if cu.device != device:
        raise ValueError(f"{name}: {arg} is on {cu.device} but q is on {device}")
    if cu.device.type == "cpu":  # free to check here (on CUDA it would cost a host sync)
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) > total:
            raise ValueError(f"{name}: {arg} must start at 0, never decrease and end at most at the "
                             f"{total} packed tokens; got {cu.tolist()}")
        if lengths.numel() and int(lengths.max()) > max_seqlen:
            raise ValueError(f"{name}: a sequence of {arg} is {int(lengths.max())} tokens long, more than "
                             f"max_seqlen {max_seqlen}")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                           softmax_scale: float | None = None) -> torch.Tensor:
    """``flash_attention`` over packed sequences of different lengths, differentiable in q, k, v.

    q (total_q, H, D) and k, v (total_k, H_kv, D) hold the sequences back to back; sequence b
    is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] and attends only to
    k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]. cu_seqlens_* are int32 (batch + 1,) on q's device,
    starting at 0; max_seqlen_* bound the sequence lengths (they size the launch grid; a longer
    sequence would be cut short, which is checked only for CPU tensors). The causal mask is
    bottom-right aligned per sequence. Returns (total_q, H, D); rows past cu_seqlens_q[-1] are 0.
    """
    name = "flash_attention_varlen"
    _check(name, q, k, v, 3, "(total_tokens, heads, head_dim)")
    for arg, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: {arg} must be a non-negative int, got {value!r}")
    _check_cu(name, "cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0], max_seqlen_q)
    _check_cu(name, "cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0], max_seqlen_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{name}: cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}; both hold batch + 1 offsets")
    scale = _scale(softmax_scale, q.shape[-1])
    if backend(q.device) == "reference":
        return flash_attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          causal=causal, softmax_scale=scale)
    o, _ = _FlashAttention.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), bool(causal), scale,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return o.squeeze(0)


# --------------------------------------------------------------------------------------------
# references (plain PyTorch)


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        softmax_scale: float | None = None, return_lse: bool = False):
    """Plain-PyTorch attention with ``flash_attention``'s signature and semantics: the S_q x S_k
    scores are materialised. As in the kernels, 16-bit inputs are computed in fp32 (scores,
    softmax and P@V; rounding each to bf16 gave 2.3x the error of PyTorch's own bf16 attention) and
    the output is rounded once to the input dtype; fp32 and float64 inputs are computed in their
    own dtype (pass float64 tensors for an exact reference). lse is float32 (float64 for float64
    inputs) and carries no gradient."""
    _, S_q, H, D = q.shape
    S_k, H_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.transpose(1, 2).to(compute)  # (B, H, S_q, D)
    kh = k.transpose(1, 2).to(compute).repeat_interleave(H // H_kv, dim=1)  # (B, H, S_k, D)
    vh = v.transpose(1, 2).to(compute).repeat_interleave(H // H_kv, dim=1)  # (B, H, S_k, D)
    scores = (qh * scale) @ kh.transpose(-2, -1)  # (B, H, S_q, S_k)
    rows = torch.arange(S_q, device=q.device)[:, None]
    cols = torch.arange(S_k, device=q.device)[None, :]
    allowed = cols <= rows + (S_k - S_q) if causal else torch.ones(S_q, S_k, dtype=torch.bool, device=q.device)
    empty = ~allowed.any(-1, keepdim=True)  # (S_q, 1): rows with no key at all
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.detach(), dim=-1)  # -inf on empty rows
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = (p @ vh).transpose(1, 2).to(q.dtype)  # (B, S_q, H, D)
    return (out, lse) if return_lse else out


def flash_attention_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                               softmax_scale: float | None = None) -> torch.Tensor:
    """``flash_attention_varlen`` as a loop of ``flash_attention_ref`` over the sequences."""
    out = torch.zeros_like(q)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    for b in range(len(cu_q) - 1):
        q_b = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        k_b, v_b = k[cu_k[b]:cu_k[b + 1]].unsqueeze(0), v[cu_k[b]:cu_k[b + 1]].unsqueeze(0)
        pieces.append(flash_attention_ref(q_b, k_b, v_b, causal=causal, softmax_scale=softmax_scale).squeeze(0))
    if not pieces:
        return out
    head = torch.cat(pieces)
    return torch.cat([head, out[head.shape[0]:]]) if head.shape[0] < q.shape[0] else head
