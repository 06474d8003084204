"""Fused multi-tensor AdamW step: launcher, dispatch and the plain-PyTorch reference.

Dispatch: CPU tensors -> C++ kernel (SIMD + OpenMP, one pass over memory); CUDA tensors ->
multi-tensor CUDA kernel; anything else, or no compiled extension -> ``adamw_ref``.
``parallax.ops.backend("adamw", device)`` says which one runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parallax import _extension

__all__ = ["adamw_", "adamw_ref", "fused_adamw_", "kernel_can_take", "backend", "KERNEL_DTYPES"]

Tensors = Sequence[torch.Tensor]

# Dtypes the compiled kernels accept for grads and for the low-precision parameter copy.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _extension.available():

    @torch.library.register_fake("parallax::adamw_")
    def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, params_out, lr, beta1, beta2, eps,
                    weight_decay, step, maximize) -> None:
        return None


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``adamw_`` uses for tensors on ``device``: 'cpp', 'cuda' or 'reference'."""
    device_type = torch.device(device).type
    if device_type == "cpu" and _extension.has_kernel("adamw_", "cpu"):
        return "cpp"
    if device_type == "cuda" and _extension.has_kernel("adamw_", "cuda"):
        return "cuda"
    return "reference"


def _check(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
           params_out: Tensors, step: float) -> None:
    n = len(params)
    for name, seq in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if len(seq) != n:
            raise ValueError(f"adamw_: {name} has {len(seq)} tensors but params has {n}")
    if len(params_out) not in (0, n):
        raise ValueError(f"adamw_: params_out must be empty or hold {n} tensors, got {len(params_out)}")
    if step < 1:
        raise ValueError(f"adamw_: step must be >= 1 (it counts the update being applied), got {step}")
    for i, p in enumerate(params):
        others = [("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        for name, t in (("params", p), *others):
            if t.is_complex():
                raise ValueError(f"adamw_: {name}[{i}] is {t.dtype}; pass complex tensors as torch.view_as_real views "
                                 "(parallax.optim.AdamW does this for complex parameters)")
        if params_out:
            others.append(("params_out", params_out[i]))
        for name, t in others:
            if t.shape != p.shape:
                raise ValueError(f"adamw_: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] has {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"adamw_: {name}[{i}] is on {t.device}, params[{i}] on {p.device}")


def kernel_can_take(device: torch.device, params: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                    params_out: Tensors) -> bool:
    """True when a compiled kernel exists for ``device`` and accepts these (non-gradient) tensors:
    fp32 and contiguous params and moments, contiguous fp32/bf16/fp16 ``params_out``."""
    if backend(device) == "reference":
        return False
    fp32 = (*params, *exp_avgs, *exp_avg_sqs)
    if any(t.dtype != torch.float32 for t in fp32):
        return False
    if any(t.dtype not in KERNEL_DTYPES for t in params_out):
        return False
    return all(t.is_contiguous() for t in (*fp32, *params_out))


def adamw_(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    params_out: Tensors = (),
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """One AdamW update (torch.optim.AdamW semantics) of every tensor in ``params``, in place.

    All lists hold real tensors of matching shapes on one device. ``step`` is the 1-based count of
    this update (bias correction). ``params`` are fp32 (the master weights in mixed precision);
    ``grads`` may be fp32, bf16 or fp16. When ``params_out`` is given, the updated values are
    also written there in its dtype (the low-precision model weights), in the same pass.
    Inputs the kernels cannot take (non-contiguous, other dtypes such as fp64) go to ``adamw_ref``.
    """
    if not params:
        return
    _check(params, grads, exp_avgs, exp_avg_sqs, params_out, step)
    grads_ok = all(g.dtype in KERNEL_DTYPES and g.is_contiguous() for g in grads)
    if grads_ok and kernel_can_take(params[0].device, params, exp_avgs, exp_avg_sqs, params_out):
        fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, params_out, lr=lr, beta1=beta1, beta2=beta2,
                     eps=eps, weight_decay=weight_decay, step=step, maximize=maximize)
        return
    adamw_ref(params, grads, exp_avgs, exp_avg_sqs, params_out, lr=lr, beta1=beta1, beta2=beta2,
              eps=eps, weight_decay=weight_decay, step=step, maximize=maximize)


def fused_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, params_out: Tensors,
                 *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
                 maximize: bool) -> None:
    """The compiled kernel without the Python-side checks of ``adamw_`` (the C++ side still checks
    every tensor). For callers that validated the lists once, like ``parallax.optim.AdamW``, whose
    per-step Python overhead matters for models with many small tensors."""
    torch.ops.parallax.adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(params_out),
                              float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                              float(step), bool(maximize))


@torch.no_grad()
def adamw_ref(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    params_out: Tensors = (),
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """Plain-PyTorch AdamW, op for op as torch.optim.AdamW's single-tensor path.

    Computed in fp32 for fp32/bf16/fp16 parameters and in fp64 for fp64 ones, so an fp64 update
    is torch's to the bit. ``lr`` may be a one-element tensor: like torch, the decay factor and
    step size are then formed in its dtype.
    """
    if isinstance(lr, torch.Tensor):
        lr = lr.squeeze()
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = (1 - beta2**step) ** 0.5  # torch's `** 0.5`; math.sqrt may round differently
    decay = 1 - lr * weight_decay
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        compute = torch.promote_types(p.dtype, torch.float32)
        p_c, m_c, v_c = p.to(compute), m.to(compute), v.to(compute)
        g_c = g.to(compute)
        if maximize:
            g_c = -g_c
        p_c.mul_(decay)
        m_c.lerp_(g_c, 1 - beta1)
        v_c.mul_(beta2).addcmul_(g_c, g_c, value=1 - beta2)
        denom = (v_c.sqrt() / bc2_sqrt).add_(eps)
        p_c.addcdiv_(m_c, denom, value=-step_size)
        for dst, src in ((p, p_c), (m, m_c), (v, v_c)):
            if dst is not src:  # .to() copied a tensor of another dtype: write the result back
                dst.copy_(src)
        if params_out:
            params_out[i].copy_(p_c)
