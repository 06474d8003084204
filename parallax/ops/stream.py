"""STREAM triad ``a = b + scalar * c``: the memory-bandwidth probe behind benchmark floors.

CPU tensors run the C++ kernel (OpenMP threads, widest SIMD the CPU has); anything else, or no
compiled extension, runs ``stream_triad_ref``. ``b`` may be ``a`` (the in-place pattern).
"""

from __future__ import annotations

import torch

from parallax import _extension

__all__ = ["stream_triad_", "stream_triad_ref", "backend"]

if _extension.available():

    @torch.library.register_fake("parallax::stream_triad_")
    def _stream_triad_fake(a, b, c, scalar) -> None:
        return None


def backend(device: torch.device | str = "cpu") -> str:
    """'cpp' for CPU tensors when the extension is loaded, else 'reference'."""
    return "cpp" if torch.device(device).type == "cpu" and _extension.has_kernel("stream_triad_", "cpu") else "reference"


def stream_triad_(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scalar: float) -> torch.Tensor:
    """a = b + scalar * c in place; a, b, c are float32 tensors of one shape on one device. Returns a."""
    for name, t in (("a", a), ("b", b), ("c", c)):
        if t.dtype != torch.float32:
            raise ValueError(f"stream_triad_: {name} must be float32, got {t.dtype}")
        if t.shape != a.shape or t.device != a.device:
            raise ValueError(f"stream_triad_: {name} has shape {tuple(t.shape)} on {t.device}, "
                             f"a has {tuple(a.shape)} on {a.device}")
    if backend(a.device) == "cpp" and all(t.is_contiguous() for t in (a, b, c)):
        torch.ops.parallax.stream_triad_(a, b, c, float(scalar))
    else:
        stream_triad_ref(a, b, c, scalar)
    return a


def stream_triad_ref(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scalar: float) -> torch.Tensor:
    """Plain PyTorch: a = b + scalar * c (b may be a)."""
    return torch.add(b, c, alpha=scalar, out=a)
