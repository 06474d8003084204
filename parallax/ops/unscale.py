"""Fused unscale-and-check of gradients: launcher, dispatch and the plain-PyTorch reference.

One pass over a list of gradients multiplies each by ``inv_scale`` in place (computed in fp32,
rounded back to the gradient's dtype) and sets ``found_inf`` to 1.0 if any element was inf or
NaN; the contract of torch's ``torch._amp_foreach_non_finite_check_and_unscale_``, with a Python
float ``inv_scale``. ``px.amp.LossScaler`` runs it over all (sharded, flat) gradients.

Dispatch: CPU tensors -> C++ kernel (SIMD + OpenMP); CUDA tensors -> multi-tensor CUDA kernel;
anything else, or no compiled extension -> ``unscale_ref``. Gradients a kernel cannot take
(non-contiguous, float64) go to the reference in the same call.
``parallax.ops.backend("unscale", device)`` says which one runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from parallax import _extension

__all__ = ["unscale_", "unscale_ref", "backend", "KERNEL_DTYPES"]

# Gradient dtypes the compiled kernels accept.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)

if _extension.available():

    @torch.library.register_fake("parallax::unscale_")
    def _unscale_fake(grads, found_inf, inv_scale) -> None:
        return None


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``unscale_`` uses for tensors on ``device``: 'cpp', 'cuda' or 'reference'."""
    device_type = torch.device(device).type
    if device_type == "cpu" and _extension.has_kernel("unscale_", "cpu"):
        return "cpp"
    if device_type == "cuda" and _extension.has_kernel("unscale_", "cuda"):
        return "cuda"
    return "reference"


def _check(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: float) -> None:
    if not (isinstance(found_inf, torch.Tensor) and found_inf.numel() == 1 and found_inf.dtype == torch.float32):
        what = (f"{found_inf.numel()} elements of {found_inf.dtype}" if isinstance(found_inf, torch.Tensor)
                else type(found_inf).__name__)
        raise ValueError(f"unscale_: found_inf must be a one-element float32 tensor, got {what}")
    if not (math.isfinite(inv_scale) and inv_scale > 0):
        raise ValueError(f"unscale_: inv_scale must be a positive finite number, got {inv_scale!r}")
    for i, g in enumerate(grads):
        if g.device != found_inf.device:
            raise ValueError(f"unscale_: grads[{i}] is on {g.device} but found_inf is on {found_inf.device}; "
                             "call once per device with a found_inf on that device")
        if g.dtype not in _REFERENCE_DTYPES:
            raise ValueError(f"unscale_: grads[{i}] has dtype {g.dtype}; gradients must be float32, bfloat16, "
                             "float16 or float64")


def unscale_(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: float) -> None:
    """``g *= inv_scale`` for every ``g`` in ``grads``, in place, and ``found_inf`` := 1.0 when any
    element of any gradient was inf or NaN (left unchanged otherwise, so one flag can collect
    several calls).

    ``grads`` are float32, bfloat16, float16 (or float64, by the reference) tensors on the device
    of ``found_inf``, a one-element float32 tensor. The product is computed in fp32 and rounded
    once to the gradient's dtype, so fp32 results equal ``g.mul_(inv_scale)`` bit for bit.
    """
    _check(grads, found_inf, inv_scale)
    if not grads:
        return
    if backend(found_inf.device) == "reference":
        unscale_ref(grads, found_inf, inv_scale)
        return
    fused = [g for g in grads if g.dtype in KERNEL_DTYPES and g.is_contiguous()]
    rest = [g for g in grads if not (g.dtype in KERNEL_DTYPES and g.is_contiguous())]
    if fused:
        torch.ops.parallax.unscale_(fused, found_inf, float(inv_scale))
    if rest:
        unscale_ref(rest, found_inf, inv_scale)


@torch.no_grad()
def unscale_ref(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: float) -> None:
    """Plain-PyTorch ``unscale_``: each gradient checked, multiplied in fp32 (float64 in float64)
    and written back in its dtype."""
    for g in grads:
        compute = g if g.dtype in (torch.float32, torch.float64) else g.float()
        found_inf.masked_fill_(~torch.isfinite(compute).all(), 1.0)  # no host sync
        if compute is g:
            g.mul_(inv_scale)
        else:
            g.copy_(compute.mul_(inv_scale))
