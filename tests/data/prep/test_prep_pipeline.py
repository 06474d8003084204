"""run_prep's plumbing on stand-in stages (tests/data/prep/prep_fakes.py) whose effect is known
exactly: the output layout, tokens that decode back to the kept documents, identical output with 1
and 4 workers, resume after a crash or Ctrl-C, and the overwrite rules."""

from __future__ import annotations

import json
from collections import Counter
import os
from pathlib import Path

import numpy as np
import pytest

from parallax.data import cache
from parallax.data.errors import DataError
from parallax.data.prep import scan
from parallax.data.prep.config import PrepConfig
from parallax.data.prep.pipeline import run_prep
from tests.data.prep import prep_fakes
from tests.data.prep.prep_fakes import DOCS_PER_FILE, FILES, write_corpus


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch):
    prep_fakes.install(monkeypatch)
    return prep_fakes


def _config(corpus: Path, out: Path, **kw) -> PrepConfig:
    return PrepConfig(input=str(corpus), out=str(out), format=("tokens", "jsonl"), samples=5, **kw)


def _decode(out: Path) -> list[str]:
    tokens, meta = cache.read_entry(out, "tokens")
    assert meta["tokenizer"] == {"name": "byte", "version": 1, "vocab_size": 257, "eot_id": 256}
    tokens = np.asarray(tokens)
    return [bytes(p[p != 256].astype(np.uint8)).decode() for p in np.split(tokens, np.flatnonzero(tokens == 256))]


def _counts(report) -> list[tuple]:
    return [(s.name, s.docs_in, s.docs_out, s.bytes_in, s.bytes_out, s.counts, s.removed) for s in report.stages]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("report.json", "report.html")}


def test_end_to_end_counts_tokens_and_layout(tmp_path: Path, fakes) -> None:
    kept = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    report = run_prep(_config(tmp_path / "corpus", out))
    n = FILES * DOCS_PER_FILE
    assert report.docs_read == n and report.shards == FILES
    assert [s.name for s in report.stages] == ["normalize", "gopher_quality", "toxic", "exact_dedup",
                                               "minhash_dedup", "pii"]
    assert report.stage("normalize").docs_removed == n // 8
    assert report.stage("gopher_quality").docs_removed == n // 8
    assert report.stage("exact_dedup").docs_removed == n // 8 and report.stage("minhash_dedup").docs_removed == n // 8
    assert report.stage("pii").counts == {"email": n // 8}
    assert report.docs_kept == len(kept) == n - 4 * n // 8
    assert report.stage("normalize").bytes_out < report.stage("normalize").bytes_in  # spaces stripped
    assert report.stage("gopher_quality").removed[0]["reason"].startswith("word count 2 < 3")
    # tokens: the kept documents in input order, one EOT between them, as load_dataset lays them out
    assert _decode(out) == kept
    tokens, meta = cache.read_entry(out, "tokens")
    assert len(tokens) == report.tokens == sum(len(t.encode()) for t in kept) + len(kept) - 1
    # documents/NNNNN.jsonl: one file per input file, text + the record's other fields
    docs = [json.loads(line) for p in sorted((out / "documents").iterdir()) for line in p.read_text().splitlines()]
    assert sorted(p.name for p in (out / "documents").iterdir()) == [f"{i:05d}.jsonl" for i in range(FILES)]
    assert [d["text"] for d in docs] == kept and all(set(d) == {"text", "n"} for d in docs)
    prep = json.loads((out / "prep.json").read_text())
    assert prep["complete"] is True and prep["format"] == "parallax.prep/1" and prep["tokens"] == report.tokens
    assert not (out / ".work").exists()
    removed = [json.loads(line) for line in (out / "samples" / "removed.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in removed} == {"normalize", "gopher_quality", "exact_dedup", "minhash_dedup"}
    assert sum(r["stage"] == "exact_dedup" for r in removed) == 5
    samples = [json.loads(line) for line in (out / "samples" / "kept.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(s["text"] in kept for s in samples)
    assert json.loads((out / "report.json").read_text())["docs_kept"] == len(kept)
    assert "<svg" in (out / "report.html").read_text()


def test_four_workers_same_output(tmp_path: Path, fakes) -> None:
    write_corpus(tmp_path / "corpus")
    one = run_prep(_config(tmp_path / "corpus", tmp_path / "one"))
    four = run_prep(_config(tmp_path / "corpus", tmp_path / "four", workers=4))
    assert _counts(one) == _counts(four)
    assert _files(tmp_path / "one") == _files(tmp_path / "four")


def test_resume_after_crash_in_scan_skips_finished_shards(tmp_path: Path, fakes, monkeypatch) -> None:
    write_corpus(tmp_path / "corpus")
    # the 3rd file's first normal document raises while armed; the config is the same in all three runs
    config = _config(tmp_path / "corpus", tmp_path / "out", stages={"toxic": {"on": "w48x0"}})
    run_prep(_config(tmp_path / "corpus", tmp_path / "ref", stages={"toxic": {"on": "w48x0"}}))
    monkeypatch.setattr(prep_fakes, "ARMED", True)
    with pytest.raises(prep_fakes.Boom):
        run_prep(config)
    work = tmp_path / "out" / ".work"
    assert sorted(p.name for p in (work / "scan").glob("*.json")) == ["00000.json", "00001.json"]
    assert not list(work.rglob("*.tmp"))  # the crashed shard left no half-written file
    monkeypatch.setattr(prep_fakes, "ARMED", False)
    calls: list[str] = []
    original = prep_fakes.Strip.apply
    monkeypatch.setattr(prep_fakes.Strip, "apply", lambda self, text, stats: calls.append(text) or original(
        self, text, stats))
    run_prep(config)
    assert len(calls) == (FILES - 2) * DOCS_PER_FILE  # shards 0 and 1 were not read again
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")  # byte-equal to the uninterrupted run
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    got = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["name"], s["docs_in"], s["docs_out"], s["counts"]) for s in got["stages"]] == \
        [(s["name"], s["docs_in"], s["docs_out"], s["counts"]) for s in ref["stages"]]


def test_resume_after_crash_in_write_keeps_finished_shard_files(tmp_path: Path, fakes, monkeypatch) -> None:
    write_corpus(tmp_path / "corpus")
    stage_options = {"pii": {"crash_on": "u54@"}}
    run_prep(_config(tmp_path / "corpus", tmp_path / "ref", stages=stage_options))
    config = _config(tmp_path / "corpus", tmp_path / "out", stages=stage_options)
    monkeypatch.setattr(prep_fakes, "ARMED", True)
    with pytest.raises(prep_fakes.Boom):
        run_prep(config)
    work = tmp_path / "out" / ".work"
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["00000.json", "00001.json"]
    before = {i: (work / "documents" / f"{i:05d}.jsonl").stat() for i in (0, 1)}
    monkeypatch.setattr(prep_fakes, "ARMED", False)
    run_prep(config)
    for i, st in before.items():  # moved into place, never rewritten
        after = (tmp_path / "out" / "documents" / f"{i:05d}.jsonl").stat()
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_ctrl_c_then_rerun(tmp_path: Path, fakes, monkeypatch) -> None:
    kept = write_corpus(tmp_path / "corpus")
    config = _config(tmp_path / "corpus", tmp_path / "out", stages={"toxic": {"on": "w30x0", "interrupt": True}})
    monkeypatch.setattr(prep_fakes, "ARMED", True)
    with pytest.raises(KeyboardInterrupt):
        run_prep(config)
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert (tmp_path / "out" / ".work" / "scan" / "00000.json").exists()
    monkeypatch.setattr(prep_fakes, "ARMED", False)
    run_prep(config)
    assert _decode(tmp_path / "out") == kept


def test_overwrite_rules(tmp_path: Path, fakes, monkeypatch) -> None:
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt.*--overwrite"):
        run_prep(_config(tmp_path / "corpus", out))
    first = run_prep(_config(tmp_path / "corpus", out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"  # only prep's own files are replaced
    # the same run again: complete, nothing recomputed or rewritten
    stamp = (out / "tokens.bin").stat().st_mtime_ns
    again = run_prep(_config(tmp_path / "corpus", out))
    assert again.tokens == first.tokens and (out / "tokens.bin").stat().st_mtime_ns == stamp
    # another config: refused without overwrite
    with pytest.raises(DataError, match="another prep run.*--overwrite"):
        run_prep(_config(tmp_path / "corpus", out, stages={"gopher_quality": {"min_words": 6}}))
    # a failed overwriting run leaves the earlier complete output in place
    before = _files(out)
    monkeypatch.setattr(prep_fakes, "ARMED", True)
    with pytest.raises(prep_fakes.Boom):
        run_prep(_config(tmp_path / "corpus", out, overwrite=True, stages={"toxic": {"on": "w0x0"}}))
    assert {k: v for k, v in _files(out).items() if not k.startswith(".work")} == before
    assert json.loads((out / "prep.json").read_text())["complete"] is True
    # and a successful one replaces it; documents/ goes when the new run does not write JSONL
    config = PrepConfig(input=str(tmp_path / "corpus"), out=str(out), overwrite=True,
                        stages={"gopher_quality": {"min_words": 6}})
    third = run_prep(config)
    assert third.docs_kept < first.docs_kept and not (out / "documents").exists()
    assert cache.read_entry(out, "tokens")[1]["num_tokens"] == third.tokens


def test_read_errors_skip_or_fail(tmp_path: Path, fakes) -> None:
    write_corpus(tmp_path / "corpus")
    with open(tmp_path / "corpus" / "b.jsonl", "a") as f:
        f.write('{"text": "unterminated\n')
    report = run_prep(_config(tmp_path / "corpus", tmp_path / "out"))
    assert [(Path(e["path"]).name, e["line"]) for e in report.read_errors] == [("b.jsonl", DOCS_PER_FILE + 1)]
    with pytest.raises(DataError, match=rf"b\.jsonl, line {DOCS_PER_FILE + 1}"):
        run_prep(_config(tmp_path / "corpus", tmp_path / "out2", on_error="fail"))


def test_out_inside_input_refused(tmp_path: Path, fakes) -> None:
    write_corpus(tmp_path / "corpus")
    with pytest.raises(DataError, match="inside the input directory"):
        run_prep(_config(tmp_path / "corpus", tmp_path / "corpus" / "out"))


def test_unknown_stage_option_names_it(tmp_path: Path, fakes) -> None:
    write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match=r"\[gopher_quality\] unknown option\(s\) min_wrds"):
        run_prep(_config(tmp_path / "corpus", tmp_path / "out", stages={"gopher_quality": {"min_wrds": 3}}))
    assert not os.path.exists(tmp_path / "out" / "prep.json")


# ---- the real stages, end to end, on the noisy corpus (parallax.data.prep.noisy: planted labels)


def _noisy(tmp_path: Path, n_docs: int = 300, files: int = 4) -> Path:
    from parallax.data.prep.noisy import write_noisy_corpus

    write_noisy_corpus(tmp_path / "noisy", n_docs=n_docs, files=files, seed=0)
    return tmp_path / "noisy"


def _documents(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "documents").iterdir()) for line in p.read_text().splitlines()]


def test_real_stages_remove_what_was_planted(tmp_path: Path) -> None:
    from parallax.data.prep.noisy import noisy_corpus

    rows = {row["id"]: row for row in noisy_corpus(300, seed=0)}
    corpus = _noisy(tmp_path)
    out = tmp_path / "out"
    report = run_prep(PrepConfig(input=str(corpus), out=str(out), format=("tokens", "jsonl"), samples=1000))
    kept = _documents(out)
    labels = Counter(row["planted"] for row in rows.values())
    kept_labels = Counter(doc["planted"] for doc in kept)
    assert report.docs_read == 300 and report.docs_kept == len(kept)
    assert kept_labels["exact_dup"] == 0
    # The default bands (16 x 8) make a pair at Jaccard 0.85 a candidate with probability 0.994 (the planted
    # pairs lie in [0.85, 0.95]) and the exact check accepts every one of them: all are removed.
    assert kept_labels["near_dup"] == 0 and labels["near_dup"] > 10
    assert not any(label.startswith("junk:") or label == "foreign" for label in kept_labels), kept_labels
    assert kept_labels["clean"] >= 0.95 * labels["clean"] and kept_labels["pii"] >= 0.95 * labels["pii"]
    # every planted PII value is gone from what was kept; the report counts each kind
    planted = Counter()
    for doc in kept:
        for kind, value in rows[doc["id"]].get("pii", []):
            assert value not in doc["text"], (kind, value)
            planted[kind] += 1
    pii_counts = report.stage("pii").counts
    assert all(pii_counts.get(kind, 0) >= n for kind, n in planted.items()), (pii_counts, planted)
    # removed examples name their rule; duplicates are removed by the dedup stages, not earlier
    removed = [json.loads(line) for line in (out / "samples" / "removed.jsonl").read_text().splitlines()]
    by_stage = {r["id"]: r["stage"] for r in removed}
    assert len(by_stage) == report.docs_read - report.docs_kept
    planted_by_stage = {(stage, _row_of(rows, corpus, i)["planted"]) for i, stage in by_stage.items()
                        if stage in ("exact_dedup", "minhash_dedup")}
    assert planted_by_stage == {("exact_dedup", "exact_dup"), ("minhash_dedup", "near_dup")}
    assert report.stage("exact_dedup").docs_removed == labels["exact_dup"]
    # tokens decode to the kept documents, in order, and feed a TokenDataset straight from the memmap
    assert _decode(out) == [doc["text"] for doc in kept]
    from parallax.data.dataset import TokenDataset
    from parallax.data.tokenizer import load_tokenizer

    tokens, meta = cache.read_entry(out, "tokens")
    data = TokenDataset(tokens, tokenizer=load_tokenizer(None), source=str(out), content_hash=meta["content_hash"],
                        cache_path=str(out / "tokens.bin"))
    assert isinstance(data.tokens, np.memmap) and data.num_tokens() == report.tokens


def _row_of(rows: dict, corpus: Path, doc_id: str) -> dict:
    """The noisy row behind a prep id ("part-00001.jsonl:7")."""
    name, line = doc_id.rsplit(":", 1)
    record = json.loads((corpus / name).read_text().splitlines()[int(line) - 1])
    return rows[record["id"]]


def test_real_stages_same_output_with_four_workers(tmp_path: Path) -> None:
    corpus = _noisy(tmp_path, n_docs=200)
    one = run_prep(PrepConfig(input=str(corpus), out=str(tmp_path / "one"), format=("tokens", "jsonl")))
    four = run_prep(PrepConfig(input=str(corpus), out=str(tmp_path / "four"), format=("tokens", "jsonl"), workers=4))
    assert _counts(one) == _counts(four)
    assert _files(tmp_path / "one") == _files(tmp_path / "four")


# ---- the local executor


def test_local_executor_ordered_errors_and_ctrl_c() -> None:
    import multiprocessing
    import signal
    import time

    from parallax.data.prep.executors import LocalExecutor

    items = [7, 1, 5, 0, 3, 2]
    assert LocalExecutor(1).map(prep_fakes.square_or_fail, items) == LocalExecutor(3).map(
        prep_fakes.square_or_fail, items) == [49, 1, 25, 0, 9, 4]
    with pytest.raises(DataError, match="negative item -2"):
        LocalExecutor(2).map(prep_fakes.square_or_fail, [1, -2, 3])
    # Python's own Ctrl-C handler, as in `parallax prep`: a library imported earlier in this pytest session
    # may have installed another one, and then SIGINT would not raise KeyboardInterrupt here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            LocalExecutor(2).map(prep_fakes.interrupt_parent, [0, 1])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t0 < 10  # did not wait for the 30 s tasks
    assert multiprocessing.active_children() == []  # the workers were terminated
    with pytest.raises(ValueError, match="workers must be an integer >= 1; got 0"):
        LocalExecutor(0)


def test_nothing_kept_and_out_is_a_file(tmp_path: Path, fakes) -> None:
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    report = run_prep(_config(tmp_path / "corpus", out, stages={"gopher_quality": {"min_words": 1000}}))
    assert report.docs_kept == report.tokens == 0 and report.stage("gopher_quality").docs_out == 0
    assert not (out / "tokens.bin").exists() and json.loads((out / "prep.json").read_text())["complete"] is True
    assert [p.read_text() for p in sorted((out / "documents").iterdir())] == [""] * FILES
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; expected a directory"):
        run_prep(_config(tmp_path / "corpus", tmp_path / "file"))


def test_crash_mid_swap_resumes(tmp_path: Path, fakes, monkeypatch) -> None:
    write_corpus(tmp_path / "corpus")
    run_prep(_config(tmp_path / "corpus", tmp_path / "ref"))
    out = tmp_path / "out"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out / "report.json":  # tokens.* and samples/ are already in place by then
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run_prep(_config(tmp_path / "corpus", out))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "tokens.bin").exists() and json.loads((out / "prep.json").read_text())["complete"] is False
    run_prep(_config(tmp_path / "corpus", out))
    assert _files(out) == _files(tmp_path / "ref") and not (out / ".work").exists()


def test_read_errors_capped_but_counted(tmp_path: Path, fakes) -> None:
    write_corpus(tmp_path / "corpus")
    with open(tmp_path / "corpus" / "a.jsonl", "a") as f:
        f.write("{bad\n" * (scan.MAX_READ_ERRORS + 5))
    report = run_prep(_config(tmp_path / "corpus", tmp_path / "out"))
    assert report.read_errors_total == scan.MAX_READ_ERRORS + 5
    assert len(report.read_errors) == scan.MAX_READ_ERRORS
    assert report.read_errors[-1]["line"] == DOCS_PER_FILE + scan.MAX_READ_ERRORS
