"""Triton kernels of SwiGLU, silu(gate) * up, forward and backward, in fp32.

Inputs are viewed as (rows, n_cols) with unit column stride and any row stride (the two halves
of a fused gate/up projection need no copy); outputs are contiguous. One program per (row,
block of BLOCK columns), flattened into the first grid axis (the only one without a 65535 cap).

With s = sigmoid(gate): out = gate * s * up; d gate = dout * up * s * (1 + gate * (1 - s));
d up = dout * gate * s.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_swiglu_fwd", "_swiglu_bwd"]


@triton.jit
def _tile(n_cols, BLOCK: tl.constexpr):
    """This program's row (int64) and columns, and the columns' mask."""
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(n_cols, BLOCK)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < n_cols


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, out_ptr, n_cols, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr):
    row, cols, mask = _tile(n_cols, BLOCK)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_cols, stride_dout, stride_gate, stride_up,
                stride_dgate, stride_dup, BLOCK: tl.constexpr):
    row, cols, mask = _tile(n_cols, BLOCK)
    dout = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    silu = gate * s
    dgate = dout * up * s * (1.0 + gate * (1.0 - s))
    tl.store(dgate_ptr + row * stride_dgate + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup + cols, (dout * silu).to(dup_ptr.dtype.element_ty), mask=mask)
