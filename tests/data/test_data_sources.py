"""Reading .txt, .jsonl and directories, and the errors for every kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from parallax.data import ByteTokenizer, DataError, load_dataset, resolve_source

tok = ByteTokenizer()
EOT = tok.eot_id


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def all_tokens(path: Path | None) -> list[int]:
    return load_dataset(path, val_fraction=0.5).tokens.tolist()


def joined(*docs: str) -> list[int]:
    """Expected token stream: the documents' bytes with one EOT between documents."""
    out: list[int] = []
    for i, d in enumerate(docs):
        if i:
            out.append(EOT)
        out += tok.encode(d)
    return out


def test_txt_is_one_document(data_dir: Path):
    f = data_dir / "a.txt"
    f.write_text("first line\nsecond line ünïcödé\n", encoding="utf-8")
    assert all_tokens(f) == joined("first line\nsecond line ünïcödé\n")


def test_txt_byte_order_mark_is_dropped(data_dir: Path):
    f = data_dir / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    assert all_tokens(f) == joined("hello")


def test_jsonl_one_document_per_line_blank_lines_skipped(data_dir: Path):
    f = data_dir / "d.jsonl"
    f.write_text('{"text": "alpha", "id": 1}\n\n{"text": "béta\\nline"}\n   \n{"text": "gamma"}', encoding="utf-8")
    assert all_tokens(f) == joined("alpha", "béta\nline", "gamma")


def test_directory_recursive_sorted_other_files_ignored(data_dir: Path):
    (data_dir / "sub" / "deeper").mkdir(parents=True)
    (data_dir / "b.txt").write_text("B")
    (data_dir / "a.jsonl").write_text('{"text": "A1"}\n{"text": "A2"}\n')
    (data_dir / "sub" / "c.TXT").write_text("C")
    (data_dir / "sub" / "deeper" / "d.txt").write_text("D")
    (data_dir / "notes.csv").write_text("x,y\n")
    (data_dir / ".hidden.txt").write_text("hidden")
    (data_dir / ".git").mkdir()
    (data_dir / ".git" / "HEAD.txt").write_text("hidden too")
    src = resolve_source(data_dir)
    rel = [p.relative_to(data_dir).as_posix() for p in src.files]
    assert rel == ["a.jsonl", "b.txt", "sub/c.TXT", "sub/deeper/d.txt"]
    assert all_tokens(data_dir) == joined("A1", "A2", "B", "C", "D")


def test_builtin_source_is_described():
    src = resolve_source(None)
    assert src.is_builtin and src.description.startswith("builtin:pydoc_data.topics")


def test_fingerprint_tracks_content_not_name(data_dir: Path):
    a = data_dir / "a.txt"
    a.write_text("same")
    b = data_dir / "b.txt"
    b.write_text("same")
    assert resolve_source(a).fingerprint() == resolve_source(b).fingerprint()
    b.write_text("different")
    assert resolve_source(a).fingerprint() != resolve_source(b).fingerprint()
    j = data_dir / "a.jsonl"
    j.write_text("same")
    assert resolve_source(j).fingerprint() != resolve_source(a).fingerprint()  # parsed differently


def _raises_naming(path: Path, *fragments: str) -> pytest.ExceptionInfo:
    with pytest.raises(DataError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    for frag in fragments:
        assert re.search(frag, msg), (frag, msg)
    assert isinstance(info.value, ValueError)
    return info


def test_missing_path(data_dir: Path):
    _raises_naming(data_dir / "nope.txt", "no such file")


def test_empty_txt(data_dir: Path):
    f = data_dir / "empty.txt"
    f.touch()
    _raises_naming(f, "empty")


def test_empty_jsonl(data_dir: Path):
    f = data_dir / "empty.jsonl"
    f.touch()
    _raises_naming(f, "empty")


def test_blank_lines_only_jsonl(data_dir: Path):
    f = data_dir / "blank.jsonl"
    f.write_text("\n  \n\n")
    _raises_naming(f, "no documents")


def test_empty_directory(data_dir: Path):
    _raises_naming(data_dir, "empty")


def test_directory_without_txt_or_jsonl(data_dir: Path):
    (data_dir / "table.csv").write_text("a,b\n1,2\n")
    _raises_naming(data_dir, r"no \.txt or \.jsonl", "table.csv")


def test_empty_file_inside_directory(data_dir: Path):
    (data_dir / "ok.txt").write_text("fine")
    (data_dir / "z_empty.txt").touch()
    with pytest.raises(DataError, match=re.escape(str(data_dir / "z_empty.txt")) + ".*empty"):
        load_dataset(data_dir)


def test_unsupported_file_type(data_dir: Path):
    f = data_dir / "table.csv"
    f.write_text("a,b\n")
    _raises_naming(f, "unsupported file type '.csv'")


def test_jsonl_invalid_json_names_line(data_dir: Path):
    f = data_dir / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n')
    _raises_naming(f, "line 3", "invalid JSON")


def test_jsonl_missing_text_field_names_line(data_dir: Path):
    f = data_dir / "notext.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "wrong key"}\n')
    _raises_naming(f, "line 2", "'text' field")


@pytest.mark.parametrize("line", ['["text"]', '"text"', '{"text": 3}', '{"text": null}'])
def test_jsonl_line_not_an_object_with_string_text(data_dir: Path, line: str):
    f = data_dir / "odd.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    _raises_naming(f, "line 2")


def test_jsonl_bad_line_inside_directory_names_file_and_line(data_dir: Path):
    (data_dir / "a.txt").write_text("fine")
    bad = data_dir / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{oops}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}, line 2")):
        load_dataset(data_dir)


def test_invalid_utf8(data_dir: Path):
    t = data_dir / "latin1.txt"
    t.write_bytes("café".encode("latin-1"))
    _raises_naming(t, "UTF-8")
    j = data_dir / "latin1.jsonl"
    j.write_bytes(b'{"text": "ok"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    _raises_naming(j, "line 2", "UTF-8")
