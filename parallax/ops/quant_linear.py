"""Weight-only quantized linear layers: ``x W^T + bias`` with W stored in int8 (per output channel)
or packed int4 (group-wise, asymmetric), dequantized on the fly.

Storage (the format every quantized module, checkpoint and kernel shares):

- int8: ``qweight`` (N, K) int8, ``scales`` (N,) float; ``W[n, k] = qweight[n, k] * scales[n]``.
- int4: ``qweight`` (N, K // 2) uint8, two 4-bit codes per byte along K (even k in the low
  nibble, odd k in the high one), codes in [0, 15]; ``scales`` and ``zeros`` (N, K // group_size)
  float; ``W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g]`` (AutoGPTQ's asymmetric
  scheme with float zero points, so round-to-nearest and GPTQ share it).

``int8_linear`` / ``int4_linear`` are the public ops (x (..., K) -> (..., N), differentiable in x
and bias, never in the stored weight); ``*_ref`` are the plain-PyTorch references.

Dispatch (``parallax.ops.backend("int8_linear", device)``, or ``backend=`` per call): see
``parallax.ops._triton``: Triton on CUDA (``parallax/kernels/quant_linear.py``: the packed
weight is read once and dequantized in registers, split-K while the output tiles cannot fill the
GPU), the reference on CPU unless ``TRITON_INTERPRET=1``. The Triton path's backward forms
``dy @ W`` from the dequantized weight (QLoRA trains adapters through the quantized base); the integer weight,
scales and zero points never get gradients.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["int8_linear", "int4_linear", "pack_int4", "unpack_int4", "dequantize_int8", "dequantize_int4",
           "int8_linear_ref", "int4_linear_ref", "backend", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUM_BLOCK = 1024  # elements per program of the split-K sum


def pack_int4(codes: Tensor) -> Tensor:
    """(N, K) integer codes in [0, 15], K even -> (N, K // 2) uint8 (even k in the low nibble)."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_int4: codes must be (N, K) with K even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(qweight: Tensor) -> Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes in [0, 15]."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) int8, (N,) scales -> (N, K) weight in ``dtype``."""
    return (qweight.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K // 2) packed uint8, (N, K // g) scales and zeros -> (N, K) weight in ``dtype``."""
    codes = unpack_int4(qweight).to(torch.float32)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)
    return ((codes - z) * s).to(dtype)


def int8_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) -> (..., N): dequantize to x's dtype, then ``F.linear``."""
    return F.linear(x, dequantize_int8(qweight, scales, x.dtype), bias)


def int4_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    bias: Tensor | None = None) -> Tensor:
    """x (..., K) -> (..., N): dequantize to x's dtype, then ``F.linear``."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype), bias)


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``int8_linear`` / ``int4_linear`` use by default on ``device``: 'triton' or 'reference'."""
    return _triton.default_backend(device)


# --------------------------------------------------------------------------------------------
# checks


def _check_common(op: str, x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim (..., K), got a 0-d tensor")
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be a 2-d (N, ...) tensor, got shape {tuple(qweight.shape)}")
    if not scales.is_floating_point():
        raise ValueError(f"{op}: scales must be a floating-point tensor, got {scales.dtype}")
    n = qweight.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}; they must share a dtype")


def _check_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
    _check_common("int8_linear", x, qweight, scales, bias)
    k = x.shape[-1]
    if qweight.dtype != torch.int8 or qweight.shape[1] != k:
        raise ValueError(f"int8_linear: qweight must be an int8 (N, K) tensor with K={k} (x's last dim), "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if tuple(scales.shape) != (n,):
        raise ValueError(f"int8_linear: scales must have shape (N,) = ({n},), got {tuple(scales.shape)}")


def _check_int4(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None) -> None:
    _check_common("int4_linear", x, qweight, scales, bias)
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"int4_linear: x's last dim K={k} must be even (two 4-bit codes per byte)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or k % group_size:
        raise ValueError(f"int4_linear: group_size must be a positive int dividing K={k} (e.g. 32, 64, 128), "
                         f"got {group_size!r}")
    if qweight.dtype != torch.uint8 or qweight.shape[1] != k // 2:
        raise ValueError(f"int4_linear: qweight must be a uint8 (N, K // 2) tensor with K={k} (x's last dim), "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    expected = (qweight.shape[0], k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected or not t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"int4_linear: {name} must be a float (N, K // group_size) = {expected} tensor, "
                             f"got {got}")
        if t.device != x.device:
            raise ValueError(f"int4_linear: {name} is on {t.device} but x is on {x.device}")


# --------------------------------------------------------------------------------------------
# launcher


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << (max(n, 1) - 1).bit_length()))


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Programs that fill the device: two per SM on a GPU; a few in the interpreter (split-K stays tested)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _block_k(k: int, group_size: int | None, dtype: torch.dtype) -> tuple[int, bool]:
    """(BLOCK_K, whether a K tile lies in one int4 group). int4 tiles hold at least 32 k (two dots
    of 16 or more); they divide the group size when it is a multiple of 32 (32/64/128), so a tile
    loads one scale and zero point per output channel."""
    widest = 64 if dtype == torch.float32 else 128
    if group_size is None:  # int8: per output channel, no groups
        return _pow2(k, 16, widest), False
    if group_size % 32 == 0:
        return min(group_size & -group_size, widest), True  # the largest power of two dividing it
    return _pow2(k, 32, 64), False


@functools.lru_cache(maxsize=256)  # decode calls it per layer per token: keep the launcher's Python short
def _launch_config(m: int, n: int, k: int, group_size: int | None, dtype: torch.dtype,
                   device: torch.device) -> dict:
    """Tiles and splits: decode-sized M (<= 16) gets 16-row tiles, larger M 64 x 128 (GPU) tiles;
    while the (M, N) tiles cannot fill the device, K is split too (the weight, read once, is the
    cost; the fp32 partials, split x M x N, are small beside it there)."""
    on_gpu = device.type == "cuda"
    block_m = 16 if m <= 16 else _pow2(m, 16, 64 if on_gpu else 32)
    block_n = _pow2(n, 16, (64 if m <= 16 else 128) if on_gpu else 32)
    block_k, aligned = _block_k(k, group_size, dtype)
    tiles = -(-m // block_m) * -(-n // block_n)
    k_tiles = -(-k // block_k)
    min_tiles_per_split = 4 if on_gpu else 1  # each split still streams a few K tiles
    split = max(1, min(-(-_programs_wanted(device) // tiles), k_tiles // min_tiles_per_split))
    k_split = -(-k_tiles // split) * block_k
    split = -(-k // k_split)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_ALIGNED=aligned, GROUP_M=8,
                split=split, k_split=k_split, num_warps=4 if block_m * block_n <= 64 * 64 else 8,
                num_stages=4 if m <= 16 else 3)


def _quant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int | None,
                  bias: Tensor | None) -> Tensor:
    """x (M, K) @ W^T (+ bias) -> (M, N) in x's dtype, W int8 (zeros None) or packed int4."""
    kernels = _triton.kernels("int4_linear" if zeros is not None else "int8_linear", "quant_linear", x.device)
    m, k = x.shape
    n = qweight.shape[0]
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=x.dtype, device=x.device)
    cfg = dict(_launch_config(m, n, k, group_size, x.dtype, x.device))
    split, k_split = cfg.pop("split"), cfg.pop("k_split")
    # several splits: fp32 partial sums, then one kernel adds them in split order and rounds once
    out = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    grid = (-(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"]), split)
    if zeros is not None:  # the kernel reads both through one pair of strides
        scales, zeros = scales.contiguous(), zeros.contiguous()
    scale_strides = (scales.stride(0), scales.stride(1) if zeros is not None else 0)
    kernels._quant_matmul[grid](
        x, qweight, scales, scales if zeros is None else zeros, out if bias is None else bias, out, m, n, k,
        group_size or k, k_split, x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), *scale_strides,
        out.stride(0), out.stride(1), out.stride(2), BITS=8 if zeros is None else 4, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    if split == 1:
        return out[0]
    total = torch.empty((m, n), dtype=x.dtype, device=x.device)
    kernels._sum_splits[(-(-m * n // SUM_BLOCK),)](out, total, m * n, SPLITS=split, BLOCK=SUM_BLOCK)
    return total


def _rows(t: Tensor) -> Tensor:
    """t (..., K) as (M, K): a view when the strides allow, else a copy."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class _QuantLinear(torch.autograd.Function):
    """The quantized linear layer on (M, K) rows; gradients for x and bias only."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, group_size, bias):
        out = _quant_matmul(_rows(x), qweight, scales, zeros, group_size, bias)
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.group_size, ctx.x_shape, ctx.x_dtype = group_size, x.shape, x.dtype
        return out.view(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qweight, scales, zeros = ctx.saved_tensors
        need_x, *_, need_bias = ctx.needs_input_grad
        dy = _rows(dout)
        dx = dbias = None
        if need_x:  # the dequantized weight exists only for this product
            weight = (dequantize_int8(qweight, scales, ctx.x_dtype) if zeros is None else
                      dequantize_int4(qweight, scales, zeros, ctx.group_size, ctx.x_dtype))
            dx = (dy @ weight).view(ctx.x_shape)
        if need_bias:
            dbias = dy.sum(0)
        return dx, None, None, None, None, dbias


# --------------------------------------------------------------------------------------------
# public functions


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, *,
                backend: str | None = None) -> Tensor:
    """x (..., K) @ dequantized int8 W (N, K)^T + bias -> (..., N) in x's dtype.

    qweight (N, K) int8, scales (N,) float (``W[n, k] = qweight[n, k] * scales[n]``), bias (N,) in
    x's dtype or None; x fp16, bf16 or fp32. Differentiable in x and bias. ``backend``: 'triton',
    'reference' or None (the default for the device, see ``backend``).
    """
    _check_int8(x, qweight, scales, bias)
    if _triton.pick("int8_linear", backend, x.device) == "reference":
        return int8_linear_ref(x, qweight, scales, bias)
    return _QuantLinear.apply(x, qweight, scales, None, None, bias)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """x (..., K) @ dequantized int4 W (N, K)^T + bias -> (..., N) in x's dtype.

    qweight (N, K // 2) uint8 (packed, see ``pack_int4``), scales and zeros (N, K // group_size)
    float, group_size a positive divisor of K (K even; 32, 64 and 128 are the fast ones), bias (N,)
    in x's dtype or None; x fp16, bf16 or fp32. Differentiable in x and bias. ``backend``:
    'triton', 'reference' or None (the default for the device, see ``backend``).
    """
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    if _triton.pick("int4_linear", backend, x.device) == "reference":
        return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)
    return _QuantLinear.apply(x, qweight, scales, zeros, group_size, bias)
