"""The one place that loads the compiled extension ``parallax._C`` and says what it provides.

If the extension cannot be loaded, ``import parallax`` still works: one warning names the
reason and every op falls back to its Triton kernel or its plain-PyTorch reference.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch

__all__ = ["available", "load_error", "has_kernel", "cpu_isa", "set_cpu_isa", "build_info"]


def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from parallax import _C  # registers the torch.ops.parallax.* schemas and kernels
    except (ImportError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"parallax: the compiled extension parallax._C could not be loaded ({reason}); "
            "ops fall back to Triton or plain-PyTorch references, which are slower. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    return _C, None


_C, _LOAD_ERROR = _load()


def available() -> bool:
    """True when ``parallax._C`` loaded."""
    return _C is not None


def load_error() -> str | None:
    """Why the extension did not load, or None."""
    return _LOAD_ERROR


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.parallax.<op>`` has a compiled kernel for ``device_type`` ('cpu'/'cuda').
    Cached: the kernels are registered when ``parallax._C`` loads (the ops' dispatch asks for every
    layer of every engine step; uncached it was 3% of the engine thread's Python time at batch 64)."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"parallax::{op}", key)


def cpu_isa() -> str | None:
    """SIMD instruction set the C++ CPU kernels use now ('avx512', 'avx2', 'scalar'), or None."""
    return None if _C is None else _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Force the C++ CPU kernels onto 'scalar', 'avx2' or 'avx512' (for tests and benchmarks)."""
    if _C is None:
        raise RuntimeError(f"parallax._C is not loaded ({_LOAD_ERROR})")
    _C.set_cpu_isa(name)


def build_info() -> dict[str, object]:
    """What the extension was built with, for bug reports and benchmark records."""
    if _C is None:
        return {"extension": False, "reason": _LOAD_ERROR}
    return {
        "extension": True,
        "cuda": _C.built_with_cuda(),
        "openmp": _C.built_with_openmp(),
        "cpu_isa": _C.cpu_isa(),
        "detected_cpu_isa": _C.detected_cpu_isa(),
    }
