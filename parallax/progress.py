"""``progress_bar``: a tqdm bar when tqdm is installed and the caller wants one, else None.

tqdm is an optional dependency (the ``cli`` and ``eval`` extras); library code asks for a bar and
updates it only when it got one, so the runtime core keeps depending on torch, triton and numpy.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0) -> Any | None:
    """A ``tqdm`` bar to stderr counting ``total`` units, or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        log.warning("tqdm is not installed: no progress bar (pip install tqdm)")
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
