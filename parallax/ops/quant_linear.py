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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["int8_linear", "int4_linear", "pack_int4", "unpack_int4", "dequantize_int8", "dequantize_int4", "int8_linear_ref", "int4_linear_ref"]


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


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantized int8 W (N, K)^T + bias -> (..., N) in x's dtype."""
    return int8_linear_ref(x, qweight, scales, bias)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantized int4 W (N, K)^T + bias -> (..., N) in x's dtype."""
    return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)
