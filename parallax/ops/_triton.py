"""Dispatch shared by the Triton-only ops (``rms_norm``, ``rotary_embedding``, ``swiglu``).

Each has two implementations, chosen per call with ``backend=``:

* ``"triton"``: the kernels in ``parallax/kernels/<op>.py``, compiled for CUDA tensors, run by
  Triton's interpreter for CPU tensors when ``TRITON_INTERPRET=1`` was set before their first
  use (how the tests run them on CPU; far too slow for real work).
* ``"reference"``: ``<op>_ref``, plain PyTorch, differentiable through autograd.

The default (``backend=None``) is ``"triton"`` for CUDA tensors and for CPU tensors under the
interpreter, else ``"reference"``: models running on CPU get the fast PyTorch path.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "reference")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: torch.device | str = "cpu") -> str:
    """'triton' for CUDA tensors, and for CPU tensors under ``TRITON_INTERPRET=1``; else 'reference'."""
    device_type = torch.device(device).type
    wants_triton = device_type == "cuda" or (device_type == "cpu" and interpreting())
    return "triton" if wants_triton and triton_importable() else "reference"  # triton imported only then


def pick(op: str, requested: str | None, device: torch.device) -> str:
    """The implementation ``op`` runs on ``device``: ``requested`` when it can run there, the default
    when it is None; a clear ValueError otherwise."""
    if requested is None:
        return default_backend(device)
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, BACKENDS))} or None, got {requested!r}")
    if requested == "triton" and default_backend(device) != "triton":
        raise ValueError(f"{op}: backend='triton' cannot run on {device.type} tensors here: Triton runs on CUDA "
                         "tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before the kernels are first "
                         "used); use backend='reference' or None")
    return requested


def kernels(op: str, name: str, device: torch.device) -> ModuleType:
    """``parallax.kernels.<name>``, imported on first use (``triton.jit`` reads TRITON_INTERPRET at
    import); checks that CPU tensors meet interpreted kernels."""
    module = importlib.import_module(f"parallax.kernels.{name}")
    if device.type == "cpu" and not _is_interpreted(module):
        raise RuntimeError(f"{op}: TRITON_INTERPRET=1 was set after parallax.kernels.{name} had been imported for "
                           f"compiled use; set it before the first {op} call in this process")
    return module


def _is_interpreted(module: ModuleType) -> bool:
    """Whether ``module``'s kernels were made by ``triton.jit`` under the interpreter."""
    from triton.runtime.jit import JITFunction

    return not any(isinstance(fn, JITFunction) for fn in vars(module).values())
