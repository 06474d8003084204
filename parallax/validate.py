"""Checks of user-supplied values: each raises ``ValueError`` naming the argument and what was expected.

One place for what configs, engines and launchers all check (``bool`` is an ``int`` subclass, but
``True`` is never a meaningful size; numpy and 0-d integer tensor scalars count as integers).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["is_int", "is_real", "positive_int", "non_negative_int", "positive_number"]


def is_int(x: Any) -> bool:
    """An integer: Python or numpy integral, or a 0-d integer tensor; never a bool."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """A real number (int or float of any kind); never a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, else ValueError naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an int >= 0, else ValueError naming ``name``."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def positive_number(name: str, value: Any, *, above_one: bool = False, below_one: bool = False) -> float:
    """``value`` as a finite float > 0 (and > 1 or < 1 when asked), else ValueError naming ``name``."""
    ok = is_real(value) and math.isfinite(value) and value > 0
    if ok and above_one:
        ok = value > 1
    if ok and below_one:
        ok = value < 1
    if not ok:
        allowed = "a number > 1" if above_one else "a number in (0, 1)" if below_one else "a positive finite number"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)
