"""The noisy corpus: deterministic, labels that say what is in the text (checked against datatrove's
Gopher/C4 filters, exact shingle Jaccard, Luhn and mod-97 written here independently), shard sizes
and atomic writes."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from parallax.data.prep import noisy
from parallax.data.prep.noisy import JUNK_KINDS, PLANTED, noisy_corpus, write_noisy_corpus

N = 300


@pytest.fixture(scope="module")
def rows():
    return noisy_corpus(N)


def _shingle_set(text: str) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}


def _luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number][::-1]
    return sum(d if i % 2 == 0 else (2 * d if d < 5 else 2 * d - 9) for i, d in enumerate(digits)) % 10 == 0


def _iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def test_deterministic_and_prefix_stable(rows):
    assert noisy_corpus(N) == rows
    assert noisy_corpus(40) == rows[:40]
    assert noisy_corpus(N, seed=1) != rows
    assert len({r["id"] for r in rows}) == N


def test_every_label_in_every_block_of_50(rows):
    assert set(PLANTED) == {"clean", "exact_dup", "near_dup", "pii", "foreign", "toxic",
                            *(f"junk:{k}" for k in JUNK_KINDS)}
    for start in range(0, N, 50):
        counts = Counter(r["planted"] for r in rows[start:start + 50])
        assert counts == Counter(noisy._BLOCK)
    assert rows[0]["planted"] == "clean"


def test_exact_duplicates_copy_an_earlier_clean_document(rows):
    index = {r["id"]: (i, r) for i, r in enumerate(rows)}
    dups = [r for r in rows if r["planted"] == "exact_dup"]
    assert dups
    for r in dups:
        i, source = index[r["dup_of"]]
        assert source["planted"] == "clean" and source["text"] == r["text"] and i < index[r["id"]][0]


def test_near_duplicates_have_the_stated_jaccard(rows):
    index = {r["id"]: (i, r) for i, r in enumerate(rows)}
    near = [r for r in rows if r["planted"] == "near_dup"]
    assert near
    for r in near:
        i, source = index[r["dup_of"]]
        assert source["planted"] == "clean" and i < index[r["id"]][0]
        a, b = _shingle_set(source["text"]), _shingle_set(r["text"])
        exact = len(a & b) / len(a | b)
        assert 0.85 <= exact <= 0.95
        assert r["jaccard"] == pytest.approx(exact, abs=1e-4)
        assert noisy.jaccard(source["text"], r["text"]) == pytest.approx(exact)


def test_distinct_clean_documents_are_far_apart(rows):
    # no accidental near duplicates: recombined sentences share few 5-grams
    clean = [_shingle_set(r["text"]) for r in rows if r["planted"] in ("clean", "pii")]
    worst = max(len(a & b) / len(a | b) for a, b in combinations(clean, 2))
    assert worst < 0.3


def test_pii_values_are_in_the_text_and_valid(rows):
    docs = [r for r in rows if r["planted"] == "pii"]
    kinds = Counter()
    for r in docs:
        assert 1 <= len(r["pii"]) <= 3
        for kind, value in r["pii"]:
            assert value in r["text"]
            kinds[kind] += 1
            if kind == "credit_card":
                digits = re.sub(r"[ -]", "", value)
                assert len(digits) == 16 and _luhn_ok(digits)
            elif kind == "iban":
                assert _iban_ok(value)
            elif kind == "email":
                assert re.fullmatch(r"[a-z]+\.[a-z]+\d+@[a-z.-]+\.[a-z]+", value)
            elif kind == "ip" and "." in value:
                octets = [int(x) for x in value.split(".")]
                assert len(octets) == 4 and all(0 <= x <= 255 for x in octets)
                assert octets[0] not in (10, 127, 172, 192)  # public: datatrove only scrubs those
    assert set(kinds) == set(noisy.PII_KINDS)  # 24 documents, up to 3 values each: every kind shows up
    assert not any(r["planted"] != "pii" and "@example" in r["text"] for r in rows)


def test_check_digit_helpers_against_known_values():
    assert noisy._luhn_complete("7992739871") == "79927398713"  # the Wikipedia example
    assert noisy._iban("GB", "WEST12345698765432") == "GB82WEST12345698765432"  # ISO 13616's example
    assert not _luhn_ok("79927398710") and _iban_ok("GB82 WEST 1234 5698 7654 32")


def test_labels_agree_with_datatrove_filters(rows):
    """The reference: datatrove's Gopher repetition, Gopher quality and C4 filters keep every clean
    document (and its copies and PII variants) and remove every junk document."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter()]

    def kept(text: str) -> bool:
        doc = Document(text=text, id="x")
        for f in filters:
            verdict = f.filter(doc)
            if not (verdict if isinstance(verdict, bool) else verdict[0]):
                return False
        return True

    for r in rows[:150]:
        if r["planted"] in ("clean", "exact_dup", "near_dup", "pii"):
            assert kept(r["text"]), r["id"]
        elif r["planted"].startswith("junk:") or r["planted"] == "foreign":
            assert not kept(r["text"]), r["id"]
    # the C4 rules themselves (not only Gopher's) catch the boilerplate kinds
    c4 = C4QualityFilter()
    for r in rows:
        if r["planted"] in ("junk:lorem", "junk:javascript", "junk:cookie"):
            assert c4.filter(Document(text=r["text"], id="x")) is not True


def test_foreign_documents_are_in_another_script(rows):
    for r in rows:
        letters = [c for c in r["text"] if c.isalpha()]
        latin = sum(c.isascii() for c in letters) / len(letters)
        assert (latin < 0.01) if r["planted"] == "foreign" else (latin > 0.95), r["id"]


def test_toxic_documents_use_the_package_word_list(rows):
    bad = set(noisy._profanity_words())
    assert len(bad) > 100

    def share(text):
        words = text.lower().split()
        return sum(w in bad for w in words) / len(words)

    for r in rows:
        if r["planted"] == "toxic":
            assert share(r["text"]) >= 0.1, r["id"]
        elif r["planted"] in ("clean", "pii", "exact_dup", "near_dup"):
            assert share(r["text"]) < 0.02, r["id"]


def test_document_sizes(rows):
    clean = [len(r["text"].encode()) for r in rows if r["planted"] == "clean"]
    assert min(clean) >= 1000 and max(clean) < 6000
    assert 1500 < sorted(clean)[len(clean) // 2] < 3500
    short = [r for r in rows if r["planted"] == "junk:short"]
    assert all(len(r["text"].split()) < 50 for r in short)


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_write_n_docs_in_contiguous_shards(tmp_path):
    paths = write_noisy_corpus(tmp_path, n_docs=103, files=4)
    assert [p.name for p in paths] == [f"part-0000{k}.jsonl" for k in range(4)]
    shards = [_read_jsonl(p) for p in paths]
    assert [len(s) for s in shards] == [26, 26, 26, 25]
    flat = [r for s in shards for r in s]
    assert flat == noisy_corpus(103)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files left
    # every duplicate's original comes first in (file, line) order
    order = {r["id"]: i for i, r in enumerate(flat)}
    assert all(order[r["dup_of"]] < order[r["id"]] for r in flat if "dup_of" in r)


def test_write_by_size(tmp_path):
    size = 200_000
    paths = write_noisy_corpus(tmp_path, size_bytes=size, files=3, seed=2)
    sizes = [p.stat().st_size for p in paths]
    biggest_doc = max(len(json.dumps(r, ensure_ascii=False).encode()) + 1 for p in paths for r in _read_jsonl(p))
    for s in sizes:
        assert size / 3 <= s < size / 3 + biggest_doc
    assert [r for p in paths for r in _read_jsonl(p)] == noisy_corpus(sum(len(_read_jsonl(p)) for p in paths),
                                                                        seed=2)


@pytest.mark.parametrize("compress,suffix", [("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")])
def test_write_compressed(tmp_path, compress, suffix):
    plain = write_noisy_corpus(tmp_path / "plain", n_docs=30, files=2)
    packed = write_noisy_corpus(tmp_path / "packed", n_docs=30, files=2, compress=compress)
    assert all(p.name.endswith(suffix) for p in packed)
    for a, b in zip(plain, packed):
        if compress == "gzip":
            data = gzip.decompress(b.read_bytes())
        else:
            import zstandard
            data = zstandard.ZstdDecompressor().stream_reader(b.read_bytes()).read()
        assert data == a.read_bytes()
    again = write_noisy_corpus(tmp_path / "again", n_docs=30, files=2, compress=compress)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in packed]  # byte-identical reruns


def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    real = noisy.iter_noisy_corpus

    def broken(*, seed):
        for i, row in enumerate(real(seed=seed)):
            if i == 15:
                raise RuntimeError("disk full")
            yield row

    monkeypatch.setattr(noisy, "iter_noisy_corpus", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_noisy_corpus(tmp_path, n_docs=40, files=4)
    # shard 0 (rows 0-9) was complete and renamed; shard 1 failed midway and left nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.jsonl"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of n_docs and size_bytes"),
    (dict(n_docs=5, size_bytes=5), "exactly one of n_docs and size_bytes"),
    (dict(n_docs=0), "n_docs must be a positive integer"),
    (dict(size_bytes=-1), "size_bytes must be a positive integer"),
    (dict(n_docs=5, files=0), "files must be a positive integer"),
    (dict(n_docs=5, compress="bz2"), "compress must be one of"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_noisy_corpus(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="n_docs must be a non-negative integer"):
        noisy_corpus(-1)
