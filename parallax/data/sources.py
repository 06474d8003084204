"""Where documents come from: the built-in corpus, a .txt file, a .jsonl file, or a directory.

A ``Source`` is resolved (and every path problem reported) before any work is done. It gives
two things: a content fingerprint, computed from raw bytes without parsing, which keys the
token cache; and the documents themselves, read only when the cache misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from parallax.data.errors import DataError

__all__ = ["Source", "resolve_source", "builtin_documents", "SUFFIXES"]

# File types a path or a directory may hold; anything else inside a directory is skipped.
SUFFIXES = (".txt", ".jsonl")
_CHUNK = 1 << 20  # bytes read at a time while hashing, so large files never sit in memory


def builtin_documents() -> list[str]:
    """The built-in corpus: CPython's own English documentation (``pydoc_data.topics``),
    one document per topic, in sorted topic order so every machine sees the same sequence.

    It ships with every CPython, so nothing is downloaded. Its size depends on the Python
    version (about 0.47 MB of text on 3.11).
    """
    from pydoc_data.topics import topics  # imported lazily: ~0.75 MB module only needed here

    return [topics[name] for name in sorted(topics)]


@dataclass(frozen=True)
class Source:
    """Documents to tokenize.

    ``files`` is empty for the built-in corpus; otherwise it holds the .txt/.jsonl files in
    reading order. ``description`` is what logs, errors and the cache sidecar show.
    """

    description: str
    files: tuple[Path, ...] = ()

    @property
    def is_builtin(self) -> bool:
        return not self.files

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the content and how it is parsed: any edit, added or removed file,
        or change of order changes it; renaming or moving the data alone does not."""
        h = hashlib.sha256()
        if self.is_builtin:
            for doc in builtin_documents():
                h.update(b"builtin\0" + hashlib.sha256(doc.encode("utf-8")).digest())
            return h.hexdigest()
        for path in self.files:
            # The suffix is hashed too: the same bytes parse differently as .txt and .jsonl.
            h.update(_kind(path).encode() + b"\0" + _file_digest(path))
        return h.hexdigest()

    def documents(self) -> Iterator[str]:
        """The documents in order; raises ``DataError`` naming the file (and line) on bad content."""
        if self.is_builtin:
            yield from builtin_documents()
            return
        for path in self.files:
            if _kind(path) == ".txt":
                yield _read_txt(path)
            else:
                yield from _read_jsonl(path)


def resolve_source(path: str | os.PathLike[str] | None) -> Source:
    """Check ``path`` and list the files to read; ``None`` means the built-in corpus.

    Raises ``DataError`` for a missing path, an unsupported or empty file, or a directory
    with no non-empty .txt/.jsonl file. Directories are searched recursively in sorted
    path order; hidden entries (names starting with '.') and other extensions are skipped.
    """
    if path is None:
        return Source(f"builtin:pydoc_data.topics (Python {platform.python_version()})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        return Source(str(p.resolve()), _list_directory(p))
    if not p.is_file():
        raise DataError(f"{p}: not a regular file or directory")
    if _kind(p) not in SUFFIXES:
        raise DataError(
            f"{p}: unsupported file type {p.suffix!r}; expected a .txt or .jsonl file, or a directory of them"
        )
    _check_not_empty(p)
    return Source(str(p.resolve()), (p,))


def _kind(path: Path) -> str:
    return path.suffix.lower()


def _list_directory(root: Path) -> tuple[Path, ...]:
    found: list[Path] = []
    ignored: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune .git, caches, ...
        for name in filenames:
            if name.startswith("."):
                continue
            f = Path(dirpath, name)
            (found if _kind(f) in SUFFIXES else ignored).append(f)
    if not found:
        if not ignored:
            raise DataError(f"{root}: directory is empty (expected .txt or .jsonl files)")
        example = ignored[0].relative_to(root).as_posix()
        raise DataError(
            f"{root}: no .txt or .jsonl files in this directory ({len(ignored)} other file(s) ignored, e.g. {example})"
        )
    # Sort by relative path with '/' separators so the order is the same on every OS.
    found.sort(key=lambda f: f.relative_to(root).as_posix())
    for f in found:
        _check_not_empty(f)
    return tuple(found)


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def _read_txt(path: Path) -> str:
    try:
        # utf-8-sig drops a leading byte-order mark, which editors on Windows like to add.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: Path) -> Iterator[str]:
    n_docs = 0
    # Binary lines decoded one at a time, so a decoding error names its exact line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not documents
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}, line {lineno}: no 'text' field; each line must be an object like "
                                '{"text": "..."}')
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f"{path}, line {lineno}: 'text' must be a string, got {type(text).__name__}")
            n_docs += 1
            yield text
    if n_docs == 0:
        raise DataError(f"{path}: no documents (every line is blank)")
