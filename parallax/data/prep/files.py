"""Whole-file writes for the preparation pipeline: a file appears under its name complete or not at all."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "write_json", "read_json", "utf8_size"]


@contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it is synced and renamed to ``path``, on any
    failure (Ctrl-C included) removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON in ``path``, written atomically."""
    with atomic_file(path) as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def utf8_size(text: str) -> int:
    """Bytes of ``text`` as UTF-8 (lone surrogates, which some inputs hold, counted as 3 bytes)."""
    return len(text.encode("utf-8", "surrogatepass"))
