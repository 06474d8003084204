"""SwiGLU, ``silu(gate) * up`` (forward and backward as Triton kernels): launcher, checks,
autograd, reference.

The gated activation of Llama-family MLPs: ``down(swiglu(gate(x), up(x)))``. Elementwise over
any shape; computed in fp32 and rounded once to the input dtype. Inputs with a contiguous last
dim are read through their row strides, so the two halves of a fused gate/up projection need
no copy; other layouts are copied once.

Dispatch (``parallax.ops.backend("swiglu", device)``, or ``backend=`` per call): see
``parallax.ops._triton``: Triton on CUDA, ``swiglu_ref`` on CPU unless ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["swiglu", "swiglu_ref", "backend", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK = 4096  # columns per program


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``swiglu`` uses by default for tensors on ``device``: 'triton' or 'reference'."""
    return _triton.default_backend(device)


def _check(gate: Tensor, up: Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
    if gate.dtype not in KERNEL_DTYPES:
        raise ValueError(f"swiglu: gate has dtype {gate.dtype}; supported: float16, bfloat16, float32")
    if up.dtype != gate.dtype:
        raise ValueError(f"swiglu: up has dtype {up.dtype} but gate has {gate.dtype}; they must share a dtype")
    if up.shape != gate.shape:
        raise ValueError(f"swiglu: up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}; they must match")
    if up.device != gate.device:
        raise ValueError(f"swiglu: up is on {up.device} but gate is on {gate.device}")


# --------------------------------------------------------------------------------------------
# launchers


def _rows_shape(gate: Tensor, up: Tensor) -> tuple[int, int]:
    """The (rows, cols) view the kernels run on: one row when both inputs are contiguous (fewest
    programs), else rows of the last dim (read through the row strides)."""
    if gate.dim() == 0 or (gate.is_contiguous() and up.is_contiguous()):
        return 1, gate.numel()
    return math.prod(gate.shape[:-1]), gate.shape[-1]


def _as_rows(t: Tensor, shape: tuple[int, int]) -> Tensor:
    """t as ``shape`` with unit column stride: a view when the strides allow, else a copy."""
    rows = t.reshape(shape)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _block(n_cols: int) -> tuple[int, int]:
    """Columns per program and its warps."""
    block = max(16, min(_MAX_BLOCK, 1 << (n_cols - 1).bit_length()))
    return block, (4 if block <= 1024 else 8)


def _forward(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up of two (rows, cols) views; contiguous (rows, cols)."""
    kernels = _triton.kernels("swiglu", "swiglu", gate.device)
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel():
        block, warps = _block(n_cols)
        kernels._swiglu_fwd[(n_rows * -(-n_cols // block),)](
            gate, up, out, n_cols, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block, num_warps=warps)
    return out


def _backward(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of gate and up, contiguous (rows, cols), from dout and the inputs (rows, cols)."""
    kernels = _triton.kernels("swiglu", "swiglu", gate.device)
    n_rows, n_cols = gate.shape
    dgate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel():
        block, warps = _block(n_cols)
        kernels._swiglu_bwd[(n_rows * -(-n_cols // block),)](
            dout, gate, up, dgate, dup, n_cols, dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0),
            dup.stride(0), BLOCK=block, num_warps=warps)
    return dgate, dup


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up through the Triton kernels, on (rows, cols) views of the inputs."""

    @staticmethod
    def forward(ctx, gate, up):
        rows_shape = _rows_shape(gate, up)
        gate_rows, up_rows = _as_rows(gate, rows_shape), _as_rows(up, rows_shape)
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.shape = gate.shape
        return _forward(gate_rows, up_rows).view(gate.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        gate_rows, up_rows = ctx.saved_tensors
        dgate, dup = _backward(_as_rows(dout, tuple(gate_rows.shape)), gate_rows, up_rows)
        return dgate.view(ctx.shape), dup.view(ctx.shape)


# --------------------------------------------------------------------------------------------
# public function and reference


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up elementwise, differentiable in gate and up.

    gate and up: one shape (any), one dtype (fp16, bf16 or fp32), one device, any strides.
    Returns a new contiguous tensor of that shape and dtype, computed in fp32.
    ``backend``: 'triton', 'reference' or None (the default for the device, see ``backend``).
    """
    _check(gate, up)
    if _triton.pick("swiglu", backend, gate.device) == "reference":
        return swiglu_ref(gate, up)
    return _SwiGLU.apply(gate, up)


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """Plain PyTorch ``silu(gate) * up``: 16-bit inputs are computed in fp32 and rounded once, as
    in the kernel; fp32 and float64 inputs in their own dtype."""
    if gate.dtype in (torch.float32, torch.float64):
        return F.silu(gate) * up
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
