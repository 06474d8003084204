"""``QuantLinear``: a linear layer whose weight is stored in int8 or packed int4 (the storage of
``parallax.ops.quant_linear``) and dequantized on the fly by ``int8_linear`` / ``int4_linear``;
and the round-to-nearest grid that both RTN and GPTQ quantize onto.

Grids (AutoGPTQ's, so the two methods share them):

- int8, per output channel, symmetric: ``scale[n] = max_k |W[n, k]| / 127``, codes
  ``round(W / scale)`` in [-127, 127].
- int4, per group of ``group_size`` input columns, asymmetric: over the group's range widened to
  contain 0, ``scale = (max - min) / 15``, ``zero = round(-min / scale)``, codes
  ``clamp(round(W / scale) + zero, 0, 15)``; ``W ~ (code - zero) * scale``.

Scales and zeros are stored in the layer's compute dtype (what ``model.to(dtype)`` casts), and
codes are always computed against the stored (rounded) scales, so dequantization is exact
with respect to what was chosen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parallax.compress.common import register_module
from parallax.ops.quant_linear import (dequantize_int4, dequantize_int8, int4_linear, int4_linear_ref, int8_linear,
                                       int8_linear_ref, pack_int4, unpack_int4)

__all__ = ["QuantLinear", "BITS", "ACTIVATIONS", "int8_scales", "int4_grid", "quantize_codes", "dequantize_codes",
           "round_to_nearest"]

BITS = (4, 8)
ACTIVATIONS = (None, "int8")
INT8_MAX = 127
INT4_MAX = 15
_ALIGNMENT = 64  # bytes: what CPU vector kernels and torch's allocator use


def int8_scales(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) float weight -> (N,) symmetric per-row scales in float32, rounded to ``dtype``."""
    amax = weight.abs().amax(dim=1).float()
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # an all-zero row: any scale
    return scales.to(dtype).float()


def int4_grid(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., g) groups of columns -> (...) scales and zeros in float32 (scales rounded to ``dtype``)."""
    low = weight.amin(dim=-1).float().clamp(max=0)
    high = weight.amax(dim=-1).float().clamp(min=0)
    span = high - low
    scales = torch.where(span > 0, span / INT4_MAX, torch.ones_like(span)).to(dtype).float()
    zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    return scales, zeros


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Codes (float, integer-valued) of ``weight`` on the grid; scales/zeros broadcast against it.
    ``zeros`` None: the symmetric int8 grid."""
    if zeros is None:
        return torch.round(weight / scales).clamp(-INT8_MAX, INT8_MAX)
    return (torch.round(weight / scales) + zeros).clamp(0, INT4_MAX)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The weight the codes stand for (inverse of ``quantize_codes`` up to rounding)."""
    return codes * scales if zeros is None else (codes - zeros) * scales


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int | None,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """RTN of an (N, K) weight: the QuantLinear buffers {qweight, scales[, zeros]} (scales and zeros
    in ``dtype``). int4 needs ``group_size`` dividing K (and K even)."""
    w = weight.detach().float()
    if bits == 8:
        scales = int8_scales(w, dtype)
        codes = quantize_codes(w, scales[:, None], None)
        return {"qweight": codes.to(torch.int8), "scales": scales.to(dtype)}
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    scales, zeros = int4_grid(groups, dtype)  # (N, K // g) each
    codes = quantize_codes(groups, scales[..., None], zeros[..., None]).reshape(n, k)
    return {"qweight": pack_int4(codes.to(torch.uint8)), "scales": scales.to(dtype), "zeros": zeros.to(dtype)}


@register_module
class QuantLinear(nn.Module):
    """y = x W^T + bias with W (out_features, in_features) stored quantized; x (..., in) -> (..., out).

    Buffers (``parallax.ops.quant_linear``'s storage): bits=8: ``qweight`` (N, K) int8, ``scales``
    (N,); bits=4: ``qweight`` (N, K // 2) uint8 (packed), ``scales`` and ``zeros`` (N, K // group_size).
    ``bias`` (N,) is a parameter in the compute dtype ``dtype``. The stored weight never trains.

    ``activations="int8"`` (bits=8 only, inference only): each token's activations are quantized
    symmetrically to int8 on the fly and multiplied in integers (W8A8; ``torch._int_mm``).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 activations: str | None = None) -> None:
        super().__init__()
        _check_layout(in_features, out_features, bits, group_size, activations)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.activations = bits, group_size, activations
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", None)
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    activations: str | None = None,
                    quantized: dict[str, torch.Tensor] | None = None) -> QuantLinear:
        """``linear`` (its dtype, device and bias) with its weight quantized: the given ``quantized``
        buffers (e.g. GPTQ's), or by default round-to-nearest."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    weight.dtype, weight.device, activations)
        if quantized is None:
            layer.load_weight_(weight)
        else:
            layer.load_quantized_(quantized)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of scales and bias; ``module.to(dtype)`` changes it)."""
        return self.scales.dtype

    @torch.no_grad()
    def load_weight_(self, weight: torch.Tensor) -> None:
        """Quantize an (out, in) float weight by round-to-nearest on a fresh grid, in place."""
        self._check_weight_shape(weight, "load_weight_")
        self.load_quantized_(round_to_nearest(weight, self.bits, self.group_size, self.dtype))

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Round an (out, in) float weight onto this layer's current grid wherever it fits (an int4
        group / int8 row whose values all lie within half a step of the grid's range), and by fresh
        RTN elsewhere, in place. Adding a small update (a merged LoRA adapter) to ``dequantized_weight()``
        and requantizing so moves each weight by at most the update, and at most half a step from
        the exact sum where the grid fits; a fresh grid would re-round every weight."""
        self._check_weight_shape(weight, "requantize_")
        fresh = round_to_nearest(weight, self.bits, self.group_size, self.dtype)
        w = weight.detach().float()
        n, k = w.shape
        if self.bits == 8:
            scales = self.scales.float()
            fits = w.abs().amax(dim=1) <= (INT8_MAX + 0.5) * scales  # (N,)
            codes = torch.where(fits[:, None], quantize_codes(w, scales[:, None], None), fresh["qweight"].float())
            self.load_quantized_({"qweight": codes.to(torch.int8),
                                  "scales": torch.where(fits, scales, fresh["scales"].float()).to(self.dtype)})
            return
        g = self.group_size
        groups = w.reshape(n, k // g, g)
        scales, zeros = self.scales.float(), self.zeros.float()  # (N, K // g)
        low, high = (-zeros - 0.5) * scales, (INT4_MAX - zeros + 0.5) * scales
        fits = ((groups >= low[..., None]) & (groups <= high[..., None])).all(dim=-1)  # (N, K // g)
        kept = quantize_codes(groups, scales[..., None], zeros[..., None])
        fresh_codes = unpack_int4(fresh["qweight"]).float().reshape(n, k // g, g)
        codes = torch.where(fits[..., None], kept, fresh_codes).reshape(n, k)
        self.load_quantized_({"qweight": pack_int4(codes.to(torch.uint8)),
                              "scales": torch.where(fits, scales, fresh["scales"].float()).to(self.dtype),
                              "zeros": torch.where(fits, zeros, fresh["zeros"].float()).to(self.dtype)})

    def _check_weight_shape(self, weight: torch.Tensor, method: str) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.{method}: weight must have shape ({self.out_features}, "
                             f"{self.in_features}), got {tuple(weight.shape)}")

    @torch.no_grad()
    def load_quantized_(self, buffers: dict[str, torch.Tensor]) -> None:
        """Copy already quantized buffers {qweight, scales[, zeros]} (this layer's shapes) in place."""
        expected = {"qweight", "scales"} | ({"zeros"} if self.bits == 4 else set())
        if set(buffers) != expected:
            raise ValueError(f"QuantLinear.load_quantized_: expected buffers {sorted(expected)}, got {sorted(buffers)}")
        for name, value in buffers.items():
            getattr(self, name).copy_(value)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight the layer computes with, in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8":
            return _w8a8_linear(x, self.qweight, self.scales, self.bias)
        # CUDA: the fused dequantizing kernels; CPU: the reference (as models/layers.py does for
        # every op: the Triton interpreter that TRITON_INTERPRET=1 turns on is for the ops' own tests)
        if self.bits == 8:
            if _aten_int8_applies(x, self.qweight, self.scales):
                return _aten_int8_linear(x, self.qweight, self.scales, self.bias)
            op = int8_linear if x.is_cuda else int8_linear_ref
            return op(x, self.qweight, self.scales, self.bias)
        op = int4_linear if x.is_cuda else int4_linear_ref
        return op(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this layer empty (``from_spec``)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None,
                "dtype": str(self.dtype).removeprefix("torch."), "activations": self.activations}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantLinear:
        fields = dict(spec)
        dtype = getattr(torch, fields.pop("dtype"))
        return cls(**fields, dtype=dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        act = f", activations={self.activations}" if self.activations else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"bias={self.bias is not None}{act}")


def _check_layout(in_features: int, out_features: int, bits: int, group_size: int | None,
                  activations: str | None) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"QuantLinear: {name} must be a positive int, got {value!r}")
    if bits not in BITS:
        raise ValueError(f"QuantLinear: bits must be one of {BITS}, got {bits!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"QuantLinear: activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "int8" and bits != 8:
        raise ValueError(f"QuantLinear: activations='int8' (W8A8) needs bits=8, got bits={bits}")
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"QuantLinear: bits=8 is per output channel, so group_size must be None, got {group_size!r}")
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"QuantLinear: group_size must be a positive int for bits=4, got {group_size!r}")
    if in_features % group_size or in_features % 2:
        raise ValueError(f"QuantLinear: group_size {group_size} must divide in_features {in_features}, "
                         "which must be even (two 4-bit codes per byte)")


def _aten_int8_applies(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """ATen's CPU int8 weight-only matmul: 16-bit activations, inference (it has no backward). Its
    kernel uses aligned vector loads: it crashes (segfault, torch 2.13) on a bf16 K that is not a
    multiple of 16 and on weights not 64-byte aligned (e.g. views into a file's buffer)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() < 1:
        return False
    if x.dtype == torch.bfloat16 and x.shape[-1] % 16:
        return False
    if not qweight.is_contiguous() or any(t.data_ptr() % _ALIGNMENT for t in (qweight, scales)):
        return False
    return not (torch.is_grad_enabled() and x.requires_grad) and hasattr(torch, "_weight_int8pack_mm")


def _aten_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) -> (..., N) through ``torch._weight_int8pack_mm`` (what torchao's int8 weight-only
    runs on CPU): it reads the int8 weight directly instead of dequantizing it per call, 3x faster
    than a bf16 ``F.linear`` and 100x faster than the dequantizing reference for a 4096 x 4096
    weight at batch 1 (2 cores, one thread)."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous() or rows.data_ptr() % _ALIGNMENT:
        rows = rows.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    y = torch._weight_int8pack_mm(rows, qweight, scales.to(x.dtype))
    y = y.reshape(*x.shape[:-1], qweight.shape[0])
    return y if bias is None else y + bias


def _w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) -> (..., N): per-token symmetric int8 activations times int8 weights, accumulated
    in int32, rescaled by both scales. Rounding has no useful gradient, so this path refuses autograd."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("QuantLinear: activations='int8' (W8A8) is inference-only (rounding the activations "
                           "stops gradients); run under torch.no_grad(), or quantize with activations=None to train")
    rows = x.reshape(-1, x.shape[-1]).float()
    amax = rows.abs().amax(dim=1, keepdim=True)
    x_scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # (M, 1)
    x_codes = torch.round(rows / x_scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    acc = _int8_matmul(x_codes, qweight)  # (M, N) int32
    out = acc.float() * x_scales * w_scales.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def _int8_matmul(a: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ qweight (N, K)^T int8 -> (M, N) int32, exactly. ``torch._int_mm`` takes any
    shape on the CPU; on CUDA it needs M > 16 and K, N multiples of 8, else a float64 matmul (exact:
    products of int8 codes summed in float64 stay integers far beyond any K)."""
    m, k = a.shape
    n = qweight.shape[0]
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a, qweight.t())
    return (a.double() @ qweight.double().t()).to(torch.int32)
