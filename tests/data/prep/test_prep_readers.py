"""Readers: every format and compression, directories (recursive, hidden entries skipped, sorted), globs,
bad input (corrupt gzip/zstd, invalid JSON, non-object, missing or non-string field, bad UTF-8, a Parquet
file without the column) under skip and fail, and bounded memory on a large file."""

from __future__ import annotations

import gzip
import json
import logging
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from parallax.data.errors import DataError
from parallax.data.prep.document import Document, ReadError
from parallax.data.prep.readers import SUPPORTED_SUFFIXES, input_root, list_inputs, read_documents

RECORDS = [{"text": "first doc", "url": "a"}, {"text": "second\ndoc é", "url": "b", "n": 2}]


def _jsonl(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith((".zst", ".zstd")):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read_all(path: Path, root: Path, **kw) -> list[Document]:
    return list(read_documents(path, root=root, **kw))


def test_supported_suffixes() -> None:
    for fmt in (".txt", ".jsonl", ".json"):
        for comp in ("", ".gz", ".zst", ".zstd"):
            assert fmt + comp in SUPPORTED_SUFFIXES
    assert ".parquet" in SUPPORTED_SUFFIXES


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.jsonl.gz", "c.json.gz", "c.jsonl.zst", "c.jsonl.zstd"])
def test_json_lines_every_compression(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / "sub" / name, _jsonl(RECORDS))
    docs = read_all(path, tmp_path)
    assert docs == [
        Document(id=f"sub/{name}:1", text="first doc", meta={"url": "a"}),
        Document(id=f"sub/{name}:2", text="second\ndoc é", meta={"url": "b", "n": 2}),
    ]


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz", "a.txt.zst", "A.TXT"])
def test_text_file_is_one_document(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, "line one\nline two\n".encode())
    assert read_all(path, tmp_path) == [Document(id=f"{name}:1", text="line one\nline two\n")]


def test_zstd_multiple_frames(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor()
    path = tmp_path / "m.jsonl.zst"
    path.write_bytes(c.compress(_jsonl(RECORDS[:1])) + c.compress(_jsonl(RECORDS[1:])))
    assert [d.text for d in read_all(path, tmp_path)] == ["first doc", "second\ndoc é"]


def test_parquet_rows_and_meta(tmp_path: Path) -> None:
    table = pa.table({"id": list(range(600)), "content": [f"doc {i}" for i in range(600)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=100)
    docs = read_all(tmp_path / "p.parquet", tmp_path, text_field="content")
    assert len(docs) == 600  # several record batches and row groups
    assert docs[0] == Document(id="p.parquet:1", text="doc 0", meta={"id": 0})
    assert docs[599] == Document(id="p.parquet:600", text="doc 599", meta={"id": 599})


def test_parquet_meta_is_json_serialisable(tmp_path: Path) -> None:
    import datetime
    import decimal

    table = pa.table({
        "text": ["a"],
        "when": pa.array([datetime.datetime(2024, 3, 10, 14, 30)], pa.timestamp("s")),
        "day": pa.array([datetime.date(2024, 3, 10)], pa.date32()),
        "price": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)),
        "tags": [["x", "y"]],
    })
    pq.write_table(table, tmp_path / "m.parquet")
    (doc,) = read_all(tmp_path / "m.parquet", tmp_path)
    assert doc.meta == {"when": "2024-03-10 14:30:00.000", "day": "2024-03-10", "price": "1.50", "tags": ["x", "y"]}
    json.dumps(doc.meta)


def test_parquet_without_the_column_lists_its_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"], "lang": ["en"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: body, lang\)"):
        read_all(tmp_path / "p.parquet", tmp_path, on_error="fail")
    errors: list[ReadError] = []
    assert read_all(tmp_path / "p.parquet", tmp_path, errors=errors) == []
    assert errors == [ReadError(str(tmp_path / "p.parquet"), None, "no column 'text' (columns: body, lang)")]


def test_parquet_non_string_column_and_nulls(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="column 'text' has type int64, expected a string"):
        read_all(tmp_path / "ints.parquet", tmp_path, on_error="fail")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    errors: list[ReadError] = []
    assert [d.id for d in read_all(tmp_path / "nulls.parquet", tmp_path, errors=errors)] == [
        "nulls.parquet:1", "nulls.parquet:3"]
    assert [(e.line, e.message) for e in errors] == [(2, "column 'text' is null")]


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
        read_all(tmp_path / "bad.parquet", tmp_path, on_error="fail")


BAD_LINES = [
    (b'{"text": "ok 1"}\n', None),
    (b'{"text": "broken\n', "invalid JSON"),
    (b"[1, 2]\n", "expected a JSON object, got list"),
    (b'{"body": "no text", "lang": "en"}\n', "no field 'text' (fields: body, lang)"),
    (b'{"text": 42}\n', "field 'text' is int, expected a string"),
    (b'{"text": null}\n', "field 'text' is NoneType, expected a string"),
    (b'{"text": "bad \xff utf8"}\n', "invalid UTF-8"),
    (b"\n", None),  # blank lines are skipped silently: they hold no record
    (b'{"text": "ok 9"}\n', None),
]


def test_bad_lines_skip_reports_path_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "bad.jsonl", b"".join(line for line, _ in BAD_LINES))
    errors: list[ReadError] = []
    with caplog.at_level(logging.WARNING):
        docs = read_all(path, tmp_path, on_error="skip", errors=errors)
    assert [d.id for d in docs] == ["bad.jsonl:1", "bad.jsonl:9"]
    expected = [(n, msg) for n, (_, msg) in enumerate(BAD_LINES, 1) if msg]
    assert [e.line for e in errors] == [n for n, _ in expected]
    for err, (_, msg) in zip(errors, expected):
        assert err.path == str(path) and msg in err.message
    assert len([r for r in caplog.records if "skipped bad input" in r.getMessage()]) == len(expected)
    assert f"{path}, line 2: invalid JSON" in caplog.text


@pytest.mark.parametrize("n", [n for n, (_, msg) in enumerate(BAD_LINES, 1) if msg])
def test_bad_lines_fail_raises_at_the_first(tmp_path: Path, n: int) -> None:
    good, (bad, msg) = BAD_LINES[0][0], BAD_LINES[n - 1]
    path = _write(tmp_path / "one.jsonl", good + bad + good)
    with pytest.raises(DataError) as info:
        read_all(path, tmp_path, on_error="fail")
    assert str(info.value).startswith(f"{path}, line 2: ") and msg in str(info.value)


@pytest.mark.parametrize("name", ["c.jsonl.gz", "c.jsonl.zst"])
def test_corrupt_compressed_stream(tmp_path: Path, name: str) -> None:
    # 8000 lines (~500 KB): several zstd blocks (128 KB each), so the first half decodes.
    path = _write(tmp_path / name, _jsonl([{"text": f"doc {i} " + "x" * 50} for i in range(8000)]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-stream
    errors: list[ReadError] = []
    docs = read_all(path, tmp_path, errors=errors)
    assert 0 < len(docs) < 8000 and [d.id for d in docs] == [f"{name}:{i}" for i in range(1, len(docs) + 1)]
    assert len(errors) == 1 and errors[0].line == len(docs) + 1 and "corrupt" in errors[0].message
    with pytest.raises(DataError, match=rf"{name}, line \d+: corrupt"):
        read_all(path, tmp_path, on_error="fail")


def test_truncated_zstd_frame_at_a_line_boundary_is_reported(tmp_path: Path) -> None:
    # The first frame is whole; the second is cut after its header, so what decodes ends at a line
    # boundary: only the frame check can tell the file is damaged (zstandard's stream_reader cannot).
    c = zstandard.ZstdCompressor()
    second = c.compress(_jsonl(RECORDS[1:]))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(c.compress(_jsonl(RECORDS[:1])) + second[:8])
    errors: list[ReadError] = []
    assert [d.id for d in read_all(path, tmp_path, errors=errors)] == ["cut.jsonl.zst:1"]
    assert [(e.line, e.message.split(" (")[0]) for e in errors] == [(2, "corrupt zst stream")]
    assert "incomplete" in errors[0].message


def test_not_gzip_at_all(tmp_path: Path) -> None:
    path = tmp_path / "fake.jsonl.gz"
    path.write_bytes(b'{"text": "plain"}\n')
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz, line 1: corrupt gz stream \(BadGzipFile"):
        read_all(path, tmp_path, on_error="fail")


def test_bad_utf8_text_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.txt", b"ok \xc3\x28 bad")
    with pytest.raises(DataError, match=r"t\.txt: invalid UTF-8 at byte 3"):
        read_all(path, tmp_path, on_error="fail")


def test_directory_recursive_sorted_hidden_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "corpus"
    for rel in ["b.jsonl", "a/z.txt", "a/b/c.jsonl.gz", "a.parquet", ".hidden.jsonl", ".git/x.jsonl",
                "a/.cache/y.txt", "README.md"]:
        _write(root / rel, b"x")
    with caplog.at_level(logging.WARNING):
        files = list_inputs(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a.parquet", "a/b/c.jsonl.gz", "a/z.txt", "b.jsonl"]
    assert "unsupported suffix" in caplog.text and "README.md" in caplog.text
    assert input_root(root) == root


def test_glob(tmp_path: Path) -> None:
    for rel in ["d/1.jsonl.gz", "d/e/2.jsonl.gz", "d/e/3.jsonl", "d/.h/4.jsonl.gz"]:
        _write(tmp_path / rel, _jsonl(RECORDS))
    pattern = f"{tmp_path}/d/**/*.jsonl.gz"
    assert input_root(pattern) == tmp_path / "d"
    files = list_inputs(pattern)
    assert [f.relative_to(tmp_path / "d").as_posix() for f in files] == ["1.jsonl.gz", "e/2.jsonl.gz"]
    docs = [d for f in files for d in read_documents(f, root=input_root(pattern))]
    assert [d.id for d in docs] == ["1.jsonl.gz:1", "1.jsonl.gz:2", "e/2.jsonl.gz:1", "e/2.jsonl.gz:2"]


def test_single_file_input(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.jsonl", _jsonl(RECORDS))
    assert list_inputs(path) == [path] and input_root(path) == tmp_path


def test_list_inputs_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_inputs(tmp_path / "missing")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"unsupported type; expected a file ending in \.txt"):
        list_inputs(tmp_path / "notes.md")
    with pytest.raises(DataError, match="holds no input files"):
        list_inputs(tmp_path)
    with pytest.raises(DataError, match="glob .* holds no input files"):
        list_inputs(f"{tmp_path}/*.jsonl")


def test_read_documents_argument_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", _jsonl(RECORDS))
    with pytest.raises(ValueError, match="on_error must be one of skip, fail, got 'ignore'"):
        read_all(path, tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="is not under root"):
        read_all(path, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="text_field must be a non-empty string"):
        read_all(path, tmp_path, text_field="")


def test_large_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    # ~16 MB of JSON lines (gzip): reading them must not hold the file, only a line at a time.
    line = json.dumps({"text": "lorem ipsum dolor sit amet " * 20, "meta": "m"}) + "\n"
    n = 16_000_000 // len(line)
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt", compresslevel=1) as f:
        for _ in range(n // 1000):
            f.write(line * 1000)
    size = (n // 1000) * 1000 * len(line)
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_documents(path, root=tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == (n // 1000) * 1000
    assert peak < size / 50, f"peak {peak} bytes for a {size}-byte file"
