"""``python -m bench prep``: the scores against the planted labels, the kept-set agreement, the process-tree
memory sampler, the corpus cache, and ``--quick`` end to end (parallax and datatrove)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import records
from bench.prep import (TreeMemory, _expect_shards, cluster_jaccard, corpus, corpus_labels, jaccard, label_scores,
                        parallax_removed)

ROOT = Path(__file__).resolve().parents[2]

LABELS = {  # id -> (planted, original)
    "a": ("clean", "a"), "b": ("clean", "b"), "c": ("pii", "c"),
    "a2": ("exact_dup", "a"), "a3": ("near_dup", "a"), "b2": ("near_dup", "b"),
    "j1": ("junk:lorem", "j1"), "j2": ("junk:short", "j2"), "f": ("foreign", "f"),
}


def test_label_scores_by_hand():
    # one copy of each cluster kept (b's copy instead of b), c kept, one junk doc slipped through
    scores = label_scores(["a", "b2", "c", "j2"], LABELS)
    assert scores == {"clean_kept": 1.0, "junk_removed": 0.5, "dups_removed": 1.0}
    # a and its near duplicate both kept: cluster a is wrong; b's cluster lost entirely: b not kept
    scores = label_scores(["a", "a3", "c"], LABELS)
    assert scores == {"clean_kept": pytest.approx(2 / 3), "junk_removed": 1.0, "dups_removed": 0.5}


def test_kept_set_agreement():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    # keeping another member of the same cluster agrees
    assert cluster_jaccard(["a", "b", "c"], ["a3", "b2", "c"], LABELS) == 1.0
    # keeping two members of a's cluster where the other keeps one does not: {a:2,b,c} vs {a,b,c}
    assert cluster_jaccard(["a", "a2", "b", "c"], ["a", "b", "c"], LABELS) == pytest.approx(3 / 4)
    assert cluster_jaccard([], [], LABELS) == 1.0


def test_parallax_removed_reads_the_report():
    report = {"stages": [{"name": "gopher_quality", "docs_in": 10, "docs_out": 7},
                         {"name": "minhash_dedup", "docs_in": 7, "docs_out": 6}]}
    assert parallax_removed(report) == {"gopher_quality": 3, "minhash_dedup": 1}
    assert parallax_removed({}) == {}


def test_datatrove_shard_guard(tmp_path):
    # datatrove's dedup filters find a task's documents by position in its own shard: a lost shard is fatal
    (tmp_path / "00000.jsonl").write_text("{}\n")
    _expect_shards(str(tmp_path), 1)
    with pytest.raises(RuntimeError, match="holds 1 shards for 2 tasks"):
        _expect_shards(str(tmp_path), 2)


def test_tree_memory_counts_grandchildren():
    """The sampler sums the RSS and PSS of every process under the one it watches: a grandchild holding
    150 MB (touched, private) must show in both peaks."""
    pytest.importorskip("psutil")
    grandchild = "b = bytearray(150_000_000); import time; time.sleep(1.0)"
    child = subprocess.Popen([sys.executable, "-c",
                              f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"])
    sampler = TreeMemory(child.pid, interval=0.01, pss_every=2)
    assert child.wait(timeout=30) == 0
    peak_rss, peak_pss = sampler.stop()
    assert peak_rss > 150e6 and peak_pss > 150e6


def test_corpus_is_generated_once(tmp_path):
    first = corpus(0.05, 2, seed=3, cache_dir=tmp_path)
    stamp = [p.stat().st_mtime_ns for p in sorted(first.iterdir())]
    time.sleep(0.01)
    again = corpus(0.05, 2, seed=3, cache_dir=tmp_path)
    assert again == first and [p.stat().st_mtime_ns for p in sorted(again.iterdir())] == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directory left
    assert sum(p.stat().st_size for p in first.glob("*.jsonl")) >= 50_000
    labels = corpus_labels(first)
    assert all(orig in labels for _, orig in labels.values())
    assert corpus(0.05, 2, seed=4, cache_dir=tmp_path) != first


def test_quick_end_to_end(tmp_path):
    pytest.importorskip("datatrove")
    pytest.importorskip("psutil")
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "prep", "--quick", "--json", "--results-dir", str(tmp_path / "results"),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["system"]: r for r in map(json.loads, filter(str.strip, done.stdout.splitlines()))}
    assert set(rows) == {"parallax", "datatrove"}, rows and next(iter(rows.values()))["notes"].get("skipped")
    assert len(records.read_records(tmp_path / "results" / "prep.jsonl")) == 2
    for r in rows.values():
        assert r["workers"] == 1 and r["docs_in"] > 50 and 0 < r["docs_kept"] < r["docs_in"]
        assert r["median_s"] > 0 and r["mb_s_per_core"] == pytest.approx(r["size_mb"] / r["median_s"])
        assert r["peak_rss_mb"] >= r["peak_pss_mb"] > 20
        # both systems keep every clean and PII document and remove every junk document of the corpus
        assert r["clean_kept"] == 1.0 and r["junk_removed"] == 1.0, r["system"]
        assert r["dups_removed"] > 0.5
        for stage in ("gopher_repetition", "gopher_quality", "c4", "exact_dedup", "minhash_dedup"):
            assert r["removed"][stage] >= 0
        assert r["kept_jaccard_clusters"] > 0.9
    # the quality rules are the same published ones: the same documents fail them
    for stage in ("gopher_repetition", "gopher_quality", "c4", "exact_dedup"):
        assert rows["parallax"]["removed"][stage] == rows["datatrove"]["removed"][stage], stage
    assert rows["parallax"]["vs_datatrove"] == pytest.approx(rows["datatrove"]["median_s"]
                                                            / rows["parallax"]["median_s"])
    assert time.perf_counter() - t0 < 60
