"""A LoRA linear layer, ``x W^T + bias + scaling * (lora_x A^T) B^T``, fused in Triton: launcher,
checks, autograd, reference.

The rank-r intermediate ``u = lora_x A^T`` (M, r) is computed once in the forward and kept for
the backward; one Triton matmul kernel adds ``scaling * u B^T`` into the same fp32 accumulator
as ``x W^T`` and rounds the sum once. The backward does the same for the input gradient:
``v = dy B`` (M, r) once, then ``dy W + scaling * v A`` in one kernel; the adapters' gradients
are ``scaling * v^T lora_x`` and ``scaling * dy^T u``; W's and the bias's only when they require
grad (a frozen base, the usual case, costs nothing).

Dtypes follow Hugging Face PEFT: x, weight and bias share the base dtype; lora_a and lora_b
share the adapter dtype, the base dtype or fp32 (PEFT keeps 16-bit models' adapters in fp32);
the LoRA path runs in the adapter dtype and the result is in the base dtype.

Dispatch (``parallax.ops.backend("lora_linear", device)``, or ``backend=`` per call): see
``parallax.ops._triton``: Triton on CUDA, ``lora_linear_ref`` on CPU unless ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["lora_linear", "lora_linear_ref", "backend", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``lora_linear`` uses by default for tensors on ``device``: 'triton' or 'reference'."""
    return _triton.default_backend(device)


# --------------------------------------------------------------------------------------------
# checks


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
           lora_x: Tensor | None) -> None:
    named = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "lora_x": lora_x}
    for name, t in named.items():
        if t is None and name in ("bias", "lora_x"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"lora_linear: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dim (..., K), got a 0-d tensor")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"lora_linear: weight must have shape (N, K) with K={k} (x's last dim), "
                         f"got {tuple(weight.shape)}")
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"lora_linear: bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
        raise ValueError(f"lora_linear: lora_a must have shape (r, K) with r >= 1 and K={k}, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_linear: lora_b must have shape (N, r) = ({n}, {r}), got {tuple(lora_b.shape)}")
    if lora_x is not None and lora_x.shape != x.shape:
        raise ValueError(f"lora_linear: lora_x has shape {tuple(lora_x.shape)} but x has {tuple(x.shape)}; "
                         "they must match")
    _check_dtypes(x, weight, bias, lora_a, lora_b, lora_x)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"lora_linear: scaling must be a finite Python number, got {scaling!r}")


def _check_dtypes(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                  lora_x: Tensor | None) -> None:
    """x, weight and bias in the base dtype; lora_a and lora_b in the adapter dtype (the base dtype
    or fp32); lora_x in either."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; they must share a dtype")
    if lora_a.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"lora_linear: lora_a has dtype {lora_a.dtype}; it must be x's dtype ({x.dtype}) "
                         "or torch.float32")
    if lora_b.dtype != lora_a.dtype:
        raise ValueError(f"lora_linear: lora_b has dtype {lora_b.dtype} but lora_a has {lora_a.dtype}; "
                         "they must share a dtype")
    if lora_x is not None and lora_x.dtype not in (x.dtype, lora_a.dtype):
        raise ValueError(f"lora_linear: lora_x has dtype {lora_x.dtype}; it must be x's ({x.dtype}) or "
                         f"lora_a's ({lora_a.dtype})")


# --------------------------------------------------------------------------------------------
# launcher


def _rows(t: Tensor) -> Tensor:
    """t (..., K) as (M, K): a view when the strides allow, else a copy."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << (max(n, 1) - 1).bit_length()))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit operands


def _launch_config(m: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes: 128 x 128 tiles for 16-bit operands on a GPU (64 x 64 for fp32, whose exact
    dots need more registers); 64 x 64 in the interpreter, where numpy does the dots."""
    wide = 128 if device.type == "cuda" and dtype != torch.float32 else 64
    block_m, block_n = _pow2(m, 16, wide), _pow2(n, 16, wide)
    block_k = 64 if dtype != torch.float32 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_pow2(r, 16, 64), GROUP_M=8,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)


def _fused_matmul(a: Tensor, b: Tensor, u: Tensor, c: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """``a @ b^T + scale * u @ c^T (+ bias)``, one fp32 accumulator, in a's dtype: a (M, K),
    b (N, K), u (M, R), c (N, R), bias (N,); any strides. Returns a contiguous (M, N)."""
    kernels = _triton.kernels("lora_linear", "lora_linear", a.device)
    (m, k), n, r = a.shape, b.shape[0], u.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    cfg = _launch_config(m, n, r, a.dtype, a.device)
    grid = (-(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"]),)
    kernels._lora_matmul[grid](
        a, b, u, c, out if bias is None else bias, out, m, n, k, r, float(scale),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), u.stride(0), u.stride(1), c.stride(0), c.stride(1),
        out.stride(0), out.stride(1), HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(a.dtype),
        LOW_RANK_PRECISION=_dot_precision(u.dtype), **cfg)
    return out


class _LoraLinear(torch.autograd.Function):
    """The fused LoRA linear layer on (M, K) rows; ``lora_x`` None means the LoRA path reads x."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, lora_x):
        x_rows = _rows(x)
        lora_rows = x_rows if lora_x is None else _rows(lora_x)
        u = lora_rows.to(lora_a.dtype) @ lora_a.t()  # (M, r), computed once, kept for the backward
        out = _fused_matmul(x_rows, weight, u, lora_b, scaling, bias)
        # activations are kept only for the gradients that read them: x for W's (and A's when the
        # LoRA path reads x), lora_x for A's; a frozen base with dropout keeps lora_x alone
        need_w, need_a = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        keep_x = need_w or (lora_x is None and need_a)
        keep_lora_x = lora_x is not None and need_a
        ctx.save_for_backward(x_rows if keep_x else None, lora_rows if keep_lora_x else None, weight, lora_a,
                              lora_b, u)
        ctx.fused_input, ctx.lora_x_dtype = lora_x is None, lora_rows.dtype
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x_rows, lora_rows, weight, lora_a, lora_b, u = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_lora_x = ctx.needs_input_grad
        s = ctx.scaling
        dy = _rows(dout)
        dy_adapter = dy.to(lora_b.dtype)
        fused_input = ctx.fused_input
        v = dy_adapter @ lora_b if need_a or need_lora_x or (need_x and fused_input) else None  # (M, r), once
        dx = dw = dbias = da = db = dlora_x = None
        if need_x and fused_input:
            dx = _fused_matmul(dy, weight.t(), v, lora_a.t(), s, None).view(ctx.x_shape)
        elif need_x:
            dx = (dy @ weight).view(ctx.x_shape)
        if need_lora_x:
            dlora_x = ((v @ lora_a) * s).to(ctx.lora_x_dtype).view(ctx.x_shape)
        if need_a:
            lora_in = (x_rows if fused_input else lora_rows).to(lora_a.dtype)
            da = (v.t() @ lora_in) * s
        if need_b:
            db = (dy_adapter.t() @ u) * s
        if need_w:
            dw = dy.t() @ x_rows
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None, dlora_x


# --------------------------------------------------------------------------------------------
# public function and reference


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                lora_x: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """A linear layer with a LoRA adapter, ``x W^T + bias + scaling * (lora_x A^T) B^T``,
    differentiable in every tensor argument.

    x (..., K); weight (N, K); bias (N,) or None; lora_a (r, K); lora_b (N, r); scaling a Python
    number (PEFT's ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA); lora_x (..., K), the LoRA
    path's input (x after dropout: PEFT drops out only there), None for x itself. x, weight and
    bias share a dtype (fp16, bf16 or fp32); lora_a and lora_b share it or are fp32 (then the
    LoRA path runs in fp32, as PEFT's); lora_x in either dtype. One device, any strides.
    Returns (..., N) in x's dtype. ``backend``: 'triton', 'reference' or None (the default for the
    device, see ``backend``).
    """
    _check(x, weight, bias, lora_a, lora_b, scaling, lora_x)
    if _triton.pick("lora_linear", backend, x.device) == "reference":
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling, lora_x)
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), lora_x)


def lora_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                    scaling: float, lora_x: Tensor | None = None) -> Tensor:
    """Plain PyTorch, Hugging Face PEFT's ``lora.Linear.forward`` step for step: the base layer,
    plus ``lora_B(lora_A(lora_x)) * scaling`` in the adapter dtype, cast back to x's dtype."""
    result = F.linear(x, weight, bias)
    lora_in = (x if lora_x is None else lora_x).to(lora_a.dtype)
    return (result + F.linear(F.linear(lora_in, lora_a), lora_b) * scaling).to(result.dtype)
