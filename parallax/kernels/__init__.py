"""Triton kernels (``@triton.jit``) only: no autograd, no checks. Launchers live in ``parallax.ops``.

Modules here are imported lazily by their launchers, on first use: ``triton.jit`` decides at
import time whether a kernel is compiled or run by the CPU interpreter (``TRITON_INTERPRET=1``).
"""
