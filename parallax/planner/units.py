"""Byte sizes as people write them ("16GB", "80GiB", "512MB") and back.

Convention (IEC, as torch's ``memory_summary`` and nvidia-smi label their figures): ``KB``/``MB``/
``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024. A bare letter
(``16G``, ``512M``) is binary, as in Slurm's ``--mem`` and ``free -g``. Units are
case-insensitive and always mean bytes; plain numbers (``17179869184``, ``80e9``) are bytes.
nvidia-smi reports binary MiB: an "80GB" H100 shows 81559MiB, i.e. ``--device-memory 81559MiB``
(about 85.5e9 bytes; ``torch.cuda.mem_get_info()`` gives the same figure in bytes).
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str, name: str = "device_bytes") -> int:
    """``value`` in bytes: an int, a float, or a string such as "16GB", "16GiB", "512MB", "80e9".

    Raises ValueError naming ``name`` for anything else, or for a size that is not positive.
    """
    hint = "use e.g. 16GB (16e9 bytes), 16GiB (16 * 2**30 bytes), 512MB, 80e9 or a plain number of bytes"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size in bytes, got {value!r}; {hint}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{name}: cannot parse {value!r} as a size; {hint}")
        number = float(match.group(1)) * _UNITS[unit]
    else:
        raise ValueError(f"{name} must be a number of bytes or a string such as '16GB', got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive size, got {value!r}")
    return int(number)


def format_bytes(n: float | None) -> str:
    """``n`` bytes in binary units with the IEC names torch prints (MiB, GiB); "?" for None."""
    if n is None:
        return "?"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
