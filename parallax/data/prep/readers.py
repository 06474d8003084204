"""Input readers: list the files of a corpus and stream their documents.

    paths = list_inputs("corpus/**/*.jsonl.gz")     # a file, a directory (recursive) or a glob
    root = input_root("corpus/**/*.jsonl.gz")       # the directory document ids are relative to
    for doc in read_documents(paths[0], root=root): ...

Formats: ``.txt`` (one document per file), ``.jsonl`` / ``.json`` (JSON lines, one object per line, the
text in ``text_field``, the other fields kept as ``Document.meta``), ``.parquet`` (read by record batch);
the text formats may be compressed with gzip (``.gz``) or zstandard (``.zst`` / ``.zstd``). Reading is
streaming: memory stays bounded by one line (or one Parquet batch), whatever the file size.

Bad input is never dropped silently: with ``on_error="fail"`` it raises ``DataError("PATH, line N: ...")``;
with ``on_error="skip"`` it is appended to ``errors`` as a ``ReadError``, logged, and reading goes on with
the next line (a corrupt compressed stream ends its file: nothing after the damage can be decoded).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import itertools
import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parallax.data.errors import DataError
from parallax.data.prep.document import Document, ReadError

__all__ = ["SUPPORTED_SUFFIXES", "ON_ERROR", "list_inputs", "input_root", "read_documents"]

log = logging.getLogger(__name__)

_TEXT_FORMATS = (".txt", ".jsonl", ".json")
_COMPRESSIONS = ("", ".gz", ".zst", ".zstd")
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    *(fmt + comp for fmt in _TEXT_FORMATS for comp in _COMPRESSIONS),
    ".parquet",
)
ON_ERROR = ("skip", "fail")
_COMPRESSED = (".gz", ".zst", ".zstd")
_GLOB_CHARS = frozenset("*?[")
# Parquet rows per record batch: ~1 MB of text at typical web-document sizes, so memory stays bounded
# while the per-batch overhead of pyarrow's conversion is amortised.
_PARQUET_BATCH_ROWS = 256


def _suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with (case-insensitive), or None."""
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def input_root(path: str | os.PathLike[str]) -> Path:
    """The directory document ids are relative to: a directory itself, a file's parent, or the longest
    leading part of a glob pattern without wildcards ("data/**/*.jsonl" -> "data")."""
    text = os.fspath(path)
    if _is_glob(text):
        lead = list(itertools.takewhile(lambda part: not _is_glob(part), Path(text).parts))
        return Path(*lead) if lead else Path(".")
    p = Path(text)
    return p if p.is_dir() else p.parent


def list_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """The input files ``path`` names, sorted by their path relative to ``input_root(path)``.

    ``path`` is a supported file, a directory (searched recursively; entries whose name starts with "."
    are skipped, as are files with an unsupported suffix, which are logged), or a glob pattern ("**"
    recurses). Raises DataError when nothing supported matches or a named file has an unsupported suffix.
    """
    text = os.fspath(path)
    expected = ", ".join(SUPPORTED_SUFFIXES)
    root = input_root(text)
    if _is_glob(text):
        # include_hidden=False (the default) keeps ".git/..." and ".cache" out, as for directories.
        matches = [Path(m) for m in glob.glob(text, recursive=True)]
        files = [m for m in matches if m.is_file() and not _hidden(m.relative_to(root))]
        unsupported = [m for m in files if _suffix(m) is None]
        files = [m for m in files if _suffix(m) is not None]
        where = f"glob {text!r}"
    else:
        p = Path(text)
        if not p.exists():
            raise DataError(f"input {text!r} does not exist")
        if p.is_file():
            if _suffix(p) is None:
                raise DataError(f"input {text!r} has an unsupported type; expected a file ending in {expected}")
            return [p]
        files, unsupported = [], []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                f = Path(dirpath, name)
                (files if _suffix(f) is not None else unsupported).append(f)
        where = f"directory {text!r}"
    if unsupported:
        log.warning("%s: skipping %d file(s) with an unsupported suffix (e.g. %s)", where, len(unsupported),
                    unsupported[0])
    if not files:
        raise DataError(f"{where} holds no input files; expected files ending in {expected}")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _lines(path: Path, suffix: str) -> Iterator[bytes]:
    """The file's decompressed lines (with their b"\\n"), read in bounded memory."""
    if suffix.endswith((".zst", ".zstd")):
        yield from _split_lines(_zstd_chunks(path))
        return
    with gzip.open(path, "rb") if suffix.endswith(".gz") else open(path, "rb") as f:
        yield from f


_CHUNK = 1 << 20


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed chunks of a zstd file of one or more frames.

    zstandard's stream_reader ends quietly at a truncated frame (a damaged file would lose its tail
    without a word), so the frames are decoded here and an incomplete last frame raises ZstdError.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as raw:
        dobj, pending = dctx.decompressobj(), False
        while chunk := raw.read(_CHUNK):
            while chunk:
                out = dobj.decompress(chunk)
                pending = True
                if out:
                    yield out
                if dobj.eof:
                    chunk, dobj, pending = dobj.unused_data, dctx.decompressobj(), False
                else:
                    chunk = b""
        if pending:
            raise zstandard.ZstdError("truncated stream: the last frame is incomplete")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    tail = b""
    for chunk in chunks:
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        for part in parts:
            yield part + b"\n"
    if tail:
        yield tail


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a damaged compressed stream raises while it is read."""
    errs: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


class _Reporter:
    """Raises or records bad input, as ``on_error`` says."""

    __slots__ = ("path", "on_error", "errors")

    def __init__(self, path: Path, on_error: str, errors: list[ReadError] | None) -> None:
        self.path, self.on_error, self.errors = path, on_error, errors

    def __call__(self, line: int | None, message: str) -> None:
        err = ReadError(path=str(self.path), line=line, message=message)
        if self.on_error == "fail":
            raise DataError(str(err))
        if self.errors is not None:
            self.errors.append(err)
        log.warning("skipped bad input: %s", err)


def read_documents(path: Path, *, root: Path, text_field: str = "text", on_error: str = "skip",
                   errors: list[ReadError] | None = None) -> Iterator[Document]:
    """Stream the documents of one input file.

    ``Document.id`` is ``"<path relative to root>:<n>"``: the 1-based line of a JSON-lines file, the
    1-based row of a Parquet file, 1 for a text file (one document). Blank JSON lines are skipped.
    Bad input (a damaged gzip/zstd stream, invalid UTF-8 or JSON, a line that is not an object, a
    missing or non-string text field, a Parquet file without the column) raises DataError naming the
    path and line when ``on_error="fail"``; with ``"skip"`` it is recorded in ``errors`` and logged.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    path, root = Path(path), Path(root)
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"input {str(path)!r} is not under root {str(root)!r}") from None
    suffix = _suffix(path)
    if suffix is None:
        raise DataError(f"input {str(path)!r} has an unsupported type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    report = _Reporter(path, on_error, errors)
    if suffix == ".parquet":
        yield from _read_parquet(path, rel, text_field, report)
    elif suffix.startswith(".txt"):
        yield from _read_text(path, suffix, rel, report)
    else:
        yield from _read_jsonl(path, suffix, rel, text_field, report)


def _read_text(path: Path, suffix: str, rel: str, report: _Reporter) -> Iterator[Document]:
    try:
        data = b"".join(_lines(path, suffix))
    except _stream_errors() as e:
        report(None, f"cannot read ({type(e).__name__}: {e})")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        report(None, f"invalid UTF-8 at byte {e.start}")
        return
    yield Document(id=f"{rel}:1", text=text)


def _read_jsonl(path: Path, suffix: str, rel: str, field: str, report: _Reporter) -> Iterator[Document]:
    stream_errors = _stream_errors()
    loads = json.loads
    lines = _lines(path, suffix)
    n = 0
    with contextlib.closing(lines):
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except stream_errors as e:
                # A damaged stream cannot be resynchronised: report where it broke and end the file.
                what = f"corrupt {suffix.rsplit('.', 1)[-1]} stream" if suffix.endswith(_COMPRESSED) else "cannot read"
                report(n + 1, f"{what} ({type(e).__name__}: {e})")
                return
            n += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report(n, f"invalid UTF-8 at byte {e.start} of the line")
                continue
            if not line.strip():
                continue
            try:
                record = loads(line)
            except json.JSONDecodeError as e:
                report(n, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            doc = _document(record, field, f"{rel}:{n}", n, report)
            if doc is not None:
                yield doc


def _document(record: Any, field: str, doc_id: str, n: int, report: _Reporter) -> Document | None:
    if not isinstance(record, dict):
        report(n, f"expected a JSON object, got {type(record).__name__}")
        return None
    text = record.pop(field, _MISSING)
    if text is _MISSING:
        report(n, f"no field {field!r} (fields: {', '.join(map(str, record)) or 'none'})")
        return None
    if not isinstance(text, str):
        report(n, f"field {field!r} is {type(text).__name__}, expected a string")
        return None
    return Document(id=doc_id, text=text, meta=record or None)


_MISSING = object()


def _read_parquet(path: Path, rel: str, field: str, report: _Reporter) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        report(None, f"cannot read Parquet ({type(e).__name__}: {e})")
        return
    with pf:
        names = pf.schema_arrow.names
        if field not in names:
            report(None, f"no column {field!r} (columns: {', '.join(names) or 'none'})")
            return
        kind = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            report(None, f"column {field!r} has type {kind}, expected a string")
            return
        others = [c for c in names if c != field]
        row = 0
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                report(row + 1, f"cannot read Parquet ({type(e).__name__}: {e})")
                return
            texts = batch.column(field).to_pylist()
            meta_cols = [_json_column(batch.column(c), pa).to_pylist() for c in others]
            for i, text in enumerate(texts):
                row += 1
                if text is None:
                    report(row, f"column {field!r} is null")
                    continue
                meta = {c: col[i] for c, col in zip(others, meta_cols)} if others else None
                yield Document(id=f"{rel}:{row}", text=text, meta=meta)


def _json_column(column: Any, pa: Any) -> Any:
    """``column`` with timestamps, dates, times, durations and decimals cast to strings, so that
    ``Document.meta`` stays JSON-serialisable like a JSON-lines record (the output writes it back)."""
    kind = column.type
    if pa.types.is_temporal(kind) or pa.types.is_decimal(kind):
        return column.cast(pa.string())
    return column
