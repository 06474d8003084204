"""The token cache: hits, invalidation, atomic writes under simulated crashes, concurrent builders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from parallax.data import ByteTokenizer, DataError, load_dataset, resolve_cache_dir
from parallax.data import cache as cache_mod


@pytest.fixture
def count_tokenize(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls to the tokenizer's array path, which only a cache miss uses."""
    calls = [0]
    original = ByteTokenizer.encode_array

    def counting(self: ByteTokenizer, text: str) -> np.ndarray:
        calls[0] += 1
        return original(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode_array", counting)
    return calls


def cache_files(root: Path) -> list[str]:
    d = root / "data"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_root: Path):
    assert resolve_cache_dir() == cache_root / "data"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("PARALLAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "parallax" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir() == Path.home() / ".cache" / "parallax" / "data"


def test_entry_layout_and_sidecar(data_dir: Path, cache_root: Path):
    f = data_dir / "a.txt"
    f.write_text("hello world")
    ds = load_dataset(f)
    names = cache_files(cache_root)
    assert len(names) == 2 and {Path(n).suffix for n in names} == {".bin", ".json"}
    bin_path = cache_root / "data" / next(n for n in names if n.endswith(".bin"))
    assert ds.cache_path == str(bin_path)
    assert np.fromfile(bin_path, dtype="<u2").tolist() == list(b"hello world")
    assert isinstance(ds.tokens, np.memmap) and not ds.tokens.flags.writeable
    meta = json.loads(bin_path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == 11
    assert meta["source"] == str(f.resolve())
    assert meta["content_hash"] == ds.content_hash
    assert meta["tokenizer"] == {"name": "byte", "version": 1, "vocab_size": 257, "eot_id": 256}
    assert meta["dtype"] == "<u2"


def test_second_load_hits_cache(data_dir: Path, cache_root: Path, count_tokenize: list[int]):
    f = data_dir / "a.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"}\n')
    first = load_dataset(f)
    assert count_tokenize[0] == 2
    mtimes = {n: (cache_root / "data" / n).stat().st_mtime_ns for n in cache_files(cache_root)}
    second = load_dataset(f)
    assert count_tokenize[0] == 2  # not tokenized again
    assert {n: (cache_root / "data" / n).stat().st_mtime_ns for n in cache_files(cache_root)} == mtimes
    assert second.tokens.tolist() == first.tokens.tolist()


def test_same_content_elsewhere_hits_cache(data_dir: Path, count_tokenize: list[int]):
    (data_dir / "a.txt").write_text("shared content")
    (data_dir / "copy.txt").write_text("shared content")
    load_dataset(data_dir / "a.txt")
    load_dataset(data_dir / "copy.txt")
    assert count_tokenize[0] == 1


def test_explicit_cache_dir_argument(data_dir: Path, tmp_path: Path, cache_root: Path):
    f = data_dir / "a.txt"
    f.write_text("abc")
    ds = load_dataset(f, cache_dir=tmp_path / "mine")
    assert Path(ds.cache_path).parent == tmp_path / "mine"
    assert cache_files(cache_root) == []


def test_content_change_invalidates(data_dir: Path, count_tokenize: list[int]):
    f = data_dir / "a.txt"
    f.write_text("version one")
    old = load_dataset(f)
    f.write_text("version two, longer")
    new = load_dataset(f)
    assert count_tokenize[0] == 2
    assert new.tokens.tolist() == list(b"version two, longer")
    assert new.content_hash != old.content_hash and new.cache_path != old.cache_path


def test_adding_a_file_to_a_directory_invalidates(data_dir: Path):
    (data_dir / "a.txt").write_text("aaa")
    before = load_dataset(data_dir)
    (data_dir / "b.txt").write_text("bbb")
    after = load_dataset(data_dir)
    assert after.tokens.tolist() == list(b"aaa") + [256] + list(b"bbb")
    assert after.content_hash != before.content_hash


def _three_file_dir(data_dir: Path) -> None:
    for name in ("a", "b", "c"):
        (data_dir / f"{name}.txt").write_text(name * 1000)


def test_crash_mid_write_leaves_nothing_and_next_load_works(data_dir: Path, cache_root: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    _three_file_dir(data_dir)
    original = ByteTokenizer.encode_array
    calls = [0]

    def crash_on_second_document(self: ByteTokenizer, text: str) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 2:  # the first document's tokens are already in the temp file
            raise OSError("simulated crash: disk full")
        return original(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode_array", crash_on_second_document)
    with pytest.raises(OSError, match="simulated crash"):
        load_dataset(data_dir)
    assert cache_files(cache_root) == []  # no final file, no stray temp file

    monkeypatch.setattr(ByteTokenizer, "encode_array", original)
    ds = load_dataset(data_dir)
    assert ds.num_tokens() == 3 * 1000 + 2
    assert len(cache_files(cache_root)) == 2


def test_crash_before_sidecar_commit_is_a_miss(data_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch):
    """Killed between moving the tokens and the sidecar into place: the orphan .bin is never read."""
    _three_file_dir(data_dir)
    real_replace = os.replace

    def replace_then_die(src: str, dst: str) -> None:
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(data_dir)
    names = cache_files(cache_root)
    assert len(names) == 1 and names[0].endswith(".bin")  # orphan tokens, no sidecar, no temp files
    monkeypatch.setattr(cache_mod.os, "replace", real_replace)
    ds = load_dataset(data_dir)
    assert ds.num_tokens() == 3002
    assert len(cache_files(cache_root)) == 2


@pytest.mark.parametrize("damage", ["truncate_bin", "delete_bin", "garble_sidecar", "wrong_key"])
def test_damaged_entry_is_rebuilt(data_dir: Path, cache_root: Path, damage: str, count_tokenize: list[int]):
    f = data_dir / "a.txt"
    f.write_text("x" * 100)
    ds = load_dataset(f)
    bin_path = Path(ds.cache_path)
    meta_path = bin_path.with_suffix(".json")
    del ds
    if damage == "truncate_bin":
        with open(bin_path, "r+b") as fh:
            fh.truncate(50)
    elif damage == "delete_bin":
        bin_path.unlink()
    elif damage == "garble_sidecar":
        meta_path.write_text("{not json")
    else:
        meta = json.loads(meta_path.read_text())
        meta["key"] = "0" * 32
        meta_path.write_text(json.dumps(meta))
    again = load_dataset(f)
    assert count_tokenize[0] == 2
    assert again.tokens.tolist() == [ord("x")] * 100


def test_empty_text_is_rejected_and_not_cached(data_dir: Path, cache_root: Path):
    f = data_dir / "blank_text.jsonl"
    f.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="0 tokens"):
        load_dataset(f)
    assert cache_files(cache_root) == []


def test_replacing_an_entry_keeps_open_memmaps_valid(data_dir: Path):
    """A rank that already mapped the tokens is unaffected when another rank replaces the files."""
    f = data_dir / "a.txt"
    f.write_text("abcdef" * 100)
    first = load_dataset(f)
    key = Path(first.cache_path).stem
    cache_mod.write_entry(Path(first.cache_path).parent, key, [np.frombuffer(b"abcdef" * 100, np.uint8)], {})
    assert first.tokens.tolist() == list(b"abcdef" * 100)
    assert load_dataset(f).tokens.tolist() == list(b"abcdef" * 100)


_WORKER = textwrap.dedent("""
    import hashlib, os, sys, time
    from pathlib import Path
    from parallax.data import load_dataset
    go = Path(sys.argv[2])
    Path(sys.argv[3]).touch()  # imports done
    while not go.exists():  # start both processes' loads at the same moment
        time.sleep(0.005)
    ds = load_dataset(sys.argv[1])
    print(ds.num_tokens(), hashlib.sha256(ds.tokens.tobytes()).hexdigest())
""")


def test_two_processes_load_the_same_dataset_at_once(data_dir: Path, tmp_path: Path, cache_root: Path):
    rng = np.random.default_rng(0)
    for i in range(4):  # ~2 MB so the two builds overlap
        words = rng.integers(97, 123, size=500_000, dtype=np.uint8).tobytes().decode()
        (data_dir / f"part{i}.txt").write_text(words)
    go = tmp_path / "go"
    env = {**os.environ, "PARALLAX_CACHE_DIR": str(cache_root)}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(data_dir), str(go), str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    expected = load_dataset(data_dir)
    want = f"{4 * 500_000 + 3} {hashlib.sha256(expected.tokens.tobytes()).hexdigest()}"
    assert [out.strip().splitlines()[-1] for out, _ in results] == [want, want]
    names = cache_files(cache_root)
    assert len(names) == 2 and not any(n.endswith(".tmp") for n in names)
