"""RMSNorm (forward and backward as Triton kernels): launcher, checks, autograd, reference.

``rms_norm(x, weight, eps)`` normalises the last dim of x (..., C) by its root mean square and
scales it by weight (C,), with Hugging Face ``LlamaRMSNorm``'s numerics: the statistics and the
normalisation in fp32, the normalised value rounded to x's dtype, then multiplied by the weight
in the promoted dtype of the two (``weight * normed.to(x.dtype)``). A bf16 x with an fp32 weight
gives an fp32 result, as in Hugging Face.

Any leading shape (Qwen3's QK-norm runs it over (B, T, H, D) with a (D,) weight) and any
strides: x is viewed as (rows, C) without a copy when its last dim is contiguous and its leading
dims merge, else copied once. The weight's gradient is accumulated in fp32.

Dispatch (``parallax.ops.backend("rms_norm", device)``, or ``backend=`` per call): see
``parallax.ops._triton``: Triton on CUDA, ``rms_norm_ref`` on CPU unless ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import math

import torch

from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["rms_norm", "rms_norm_ref", "backend", "KERNEL_DTYPES", "MAX_KERNEL_COLS"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Each kernel program holds whole rows in registers: past this width they would spill.
MAX_KERNEL_COLS = 65536
# Elements of x one forward program aims to hold (whole rows; several when C is small).
_TILE = 4096


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``rms_norm`` uses by default for tensors on ``device``: 'triton' or 'reference'."""
    return _triton.default_backend(device)


# --------------------------------------------------------------------------------------------
# checks


def _check(x: Tensor, weight: Tensor, eps: float) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rms_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"rms_norm: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dim (..., C), got a 0-d tensor")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape (C,) = ({x.shape[-1]},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")


# --------------------------------------------------------------------------------------------
# launchers


def _rows(t: Tensor) -> Tensor:
    """t (..., C) as (rows, C) with unit column stride: a view when the strides allow, else a copy."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _block_c(n_cols: int) -> int:
    return max(16, 1 << (n_cols - 1).bit_length())


def _num_warps(elements: int) -> int:
    """Warps for a tile of ``elements``: about 32 fp32 values per thread, 4 to 32 warps."""
    return min(32, max(4, elements // 1024))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """y (N, C) in the promoted dtype and rstd (N,) fp32 of x (N, C) (unit column stride) and weight (C,)."""
    kernels = _triton.kernels("rms_norm", "rms_norm", x.device)
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, rstd
    block_c = _block_c(n_cols)
    block_r = max(1, min(_TILE // block_c, 1 << (n_rows - 1).bit_length()))
    kernels._rms_norm_fwd[(-(-n_rows // block_r),)](
        x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_num_warps(block_r * block_c))
    return y, rstd


def _backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, need_dw: bool) -> tuple[Tensor, Tensor | None]:
    """dx (N, C) in x's dtype and dw (C,) in weight's dtype (None unless ``need_dw``)."""
    kernels = _triton.kernels("rms_norm", "rms_norm", x.device)
    n_rows, n_cols = x.shape
    dy = _rows(dy)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block_c = _block_c(n_cols)
    block_r = max(1, min(_TILE // block_c, 1 << (n_rows - 1).bit_length()))
    row_blocks = -(-n_rows // block_r)
    # a few programs per SM on a GPU (each walks a range of rows and writes one dw partial);
    # a few in the interpreter, where every program costs as much as a loop step
    max_programs = 2 * _sm_count(x.device) if x.device.type == "cuda" else 4
    rows_per_program = -(-row_blocks // min(row_blocks, max_programs)) * block_r
    programs = -(-n_rows // rows_per_program)
    dw_partial = torch.empty((programs, n_cols) if need_dw else (1,), dtype=torch.float32, device=x.device)
    kernels._rms_norm_bwd[(programs,)](
        dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols, rows_per_program, dy.stride(0), x.stride(0),
        dx.stride(0), BLOCK_R=block_r, BLOCK_C=block_c, COMPUTE_DW=need_dw, num_warps=_num_warps(block_r * block_c))
    return dx, (dw_partial.sum(0).to(weight.dtype) if need_dw else None)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm through the Triton kernels; x (..., C) is run as (rows, C)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = _rows(x)
        weight = weight.contiguous()
        y, rstd = _forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, rows, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


# --------------------------------------------------------------------------------------------
# public function and reference


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """RMSNorm over the last dim, differentiable in x and weight.

    x (..., C) and weight (C,): fp16, bf16 or fp32 (they may differ), on one device, any strides.
    Returns ``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`` of shape (..., C) in the
    promoted dtype of x and weight, computed in fp32 as Hugging Face's LlamaRMSNorm does.
    ``backend``: 'triton', 'reference' or None (the default for the device, see ``backend``).
    """
    _check(x, weight, eps)
    if _triton.pick("rms_norm", backend, x.device) == "reference":
        return rms_norm_ref(x, weight, eps)
    if x.shape[-1] > MAX_KERNEL_COLS:
        raise ValueError(f"rms_norm: x has C={x.shape[-1]} columns, more than the Triton kernel's "
                         f"{MAX_KERNEL_COLS}; use backend='reference'")
    return _RMSNorm.apply(x, weight, float(eps))


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch RMSNorm, Hugging Face LlamaRMSNorm's forward step for step (fp32 statistics,
    the normalised value rounded to x's dtype, then times the weight); float64 inputs are
    computed in float64 (an exact reference)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_c = x.to(compute)
    normed = x_c * torch.rsqrt(x_c.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
