"""The units the preparation pipeline passes around: a document, a removal verdict, a read error,
and the protocol every per-document stage follows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

__all__ = ["Document", "Removed", "ReadError", "Stage"]


@dataclass(slots=True)
class Document:
    """One document. ``id`` is stable and unique within a run ("corpus/a.jsonl:17": the path relative to
    the input root and the 1-based line or row); ``meta`` holds the input record's other fields, written
    back next to the cleaned ``text`` in JSONL output."""

    id: str
    text: str
    meta: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    """A stage's verdict that a document is dropped; ``reason`` names the rule and the value that failed it
    (e.g. "word count 12 < 50")."""

    reason: str


@dataclass(frozen=True, slots=True)
class ReadError:
    """Input that could not be read: the file, the 1-based line or row (None when the whole file failed)
    and what was wrong."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        return f"{where}: {self.message}"


class Stage(Protocol):
    """A per-document step: a ``@dataclass(kw_only=True)`` whose fields are its thresholds.

    ``apply`` returns the text to keep (possibly modified) or ``Removed``; it may add counts to ``stats``
    (e.g. PII replacements by kind). Stages are picklable and deterministic.
    """

    name: ClassVar[str]

    def apply(self, text: str, stats: Counter[str]) -> str | Removed: ...
