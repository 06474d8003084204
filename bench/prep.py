"""Data preparation: the same pipeline through parallax and through datatrove, on the same noisy corpus.

The corpus is ``parallax.data.prep.noisy``'s (CPython's documentation recombined into ~1-5 KB
documents with planted exact and near duplicates, PII, Gopher/C4 junk, foreign-script and toxic
documents), ``--size-mb`` of uncompressed JSONL in ``--files`` shards, generated once and cached
(``--cache-dir``; default ``$PARALLAX_CACHE_DIR/bench/prep`` or ``~/.cache/parallax/bench/prep``;
the key holds the size, shard count, seed and a hash of the generator's source).

The pipeline, in both systems: Gopher repetition, Gopher quality and C4 rules with their published
thresholds (datatrove's defaults, which parallax's stages follow), exact dedup of the survivors, MinHash
dedup of the exact survivors (word 5-grams, b x r = 16 x 8 bands: parallax's default, datasketch's
optimum for threshold 0.8, 128 permutations and recall-first weights (0.05, 0.95); datatrove gets
``MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8)``; parallax also checks each candidate
pair's exact Jaccard, its default, which only costs it time), then PII scrubbing of the kept
documents, written as JSONL. Language identification and the toxic filter are off in both: datatrove's
language filter needs a fastText model download, and it has no word-list toxicity filter.

* ``parallax``: ``run_prep(PrepConfig(format=("jsonl",), workers=N, stages={language, toxic: off}))``
  (its Unicode normalisation stays on: it is part of parallax's pipeline and costs it time).
* ``datatrove``: ``LocalPipelineExecutor`` runs, tasks = shards, ``workers=N``, the way its MinHash
  example chains them: (1) JsonlReader -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter
  -> JsonlWriter -> ExactDedupSignature; (2) ExactFindDedups; (3) JsonlReader -> ExactDedupFilter ->
  JsonlWriter -> MinhashDedupSignature; (4) MinhashDedupBuckets (one task per band); (5)
  MinhashDedupCluster; (6) JsonlReader -> MinhashDedupFilter -> PIIFormatter -> JsonlWriter. Its
  PIIFormatter replaces only e-mail and public IP addresses (parallax also phones, cards, IBANs, secrets).
  Intermediate and final JSONL are written uncompressed, like parallax's.

Each run is a fresh subprocess (``--repeats`` per system, systems alternating so drift hits both); its
time is the pipeline's wall time inside the subprocess (imports excluded), its memory the peak over
the run of the summed RSS of the process tree (the subprocess and every worker it starts, sampled
every 20 ms with psutil; pages shared after fork count once per process, so an upper bound) and of
the summed PSS (shared pages split between their processes: the tree's footprint; 100 ms samples).
Both include what the subprocess imports (``import parallax`` loads torch: ~240 MB RSS). ``MB/s
per core`` = corpus MB / median seconds / workers. ``vs datatrove`` = parallax's throughput over
datatrove's (goal >= 2). ``kept J`` is the Jaccard similarity of the two systems' kept document
ids; ``kept J (clusters)`` maps each duplicate to the document it copies first and compares the
multisets, so that keeping a different member of a duplicate cluster does not count as a
disagreement but keeping two members where the other system keeps one does. ``clean kept``,
``junk removed`` and ``dups removed`` score each system against the corpus labels. Records also
hold ``removed`` (documents per stage), ``stage_s`` (seconds per stage summed over workers:
parallax's report, datatrove's step time stats, where a step that times its whole loop, such as
ExactDedupFilter, includes the downstream steps its documents flow through) and ``phase_s`` (wall
seconds of each datatrove executor run), to see which stage dominates.
``--profile DIR`` runs each system once under cProfile (use ``--workers 1``) and writes
``DIR/<system>.prof`` and the top functions to ``DIR/<system>.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parallax.data.prep.dedup import MinHashDedup

from .table import Column

SYSTEMS = ("parallax", "datatrove")
STAGES = ("gopher_repetition", "gopher_quality", "c4", "exact_dedup", "minhash_dedup")
# parallax's default bands x rows (16 x 8: datasketch's optimum for threshold 0.8, 128 permutations, weights
# (0.05, 0.95)), given to datatrove too.
BANDS, ROWS = MinHashDedup().bands, MinHashDedup().rows
DEFAULT = dict(size_mb=200.0, repeats=3)
QUICK = dict(size_mb=0.2, repeats=1)
ROOT = Path(__file__).resolve().parent.parent

COLUMNS = [
    Column("system", "system"),
    Column("workers", "workers", "d"),
    Column("size_mb", "corpus [MB]", ".1f"),
    Column("median_s", "median [s]", ".2f"),
    Column("mb_s_per_core", "MB/s/core", ".2f"),
    Column("peak_rss_mb", "peak RSS [MB]", ".0f"),
    Column("peak_pss_mb", "peak PSS [MB]", ".0f"),
    Column("docs_kept", "kept", "d"),
    Column("vs_datatrove", "vs datatrove [x]", ".2f"),
    Column("kept_jaccard", "kept J", ".4f"),
    Column("kept_jaccard_clusters", "kept J (clusters)", ".4f"),
    Column("clean_kept", "clean kept", ".3f"),
    Column("junk_removed", "junk removed", ".3f"),
    Column("dups_removed", "dups removed", ".3f"),
]


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--size-mb", dest="size_mb", type=float, default=None,
                        help=f"corpus size, MB of JSONL (default {DEFAULT['size_mb']:g}; --quick: {QUICK['size_mb']:g})")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of each system (default: min(4, usable cores); --quick: 1)")
    parser.add_argument("--files", type=int, default=None,
                        help="corpus shards = tasks of each system (default: max(4, workers); --quick: 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"runs per system (default {DEFAULT['repeats']}; --quick: {QUICK['repeats']})")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of parallax,datatrove")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--cache-dir", dest="cache_dir", default=None, help="where generated corpora are kept")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also run each system once under cProfile; write DIR/<system>.prof and .txt")


# --------------------------------------------------------------------------------------------
# the corpus


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Where generated corpora are cached: ``override``, else $PARALLAX_CACHE_DIR/bench/prep, else
    $XDG_CACHE_HOME (~/.cache)/parallax/bench/prep."""
    if override is not None:
        return Path(override).expanduser()
    root = os.environ.get("PARALLAX_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "bench" / "prep"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "parallax" / "bench" / "prep"


def corpus(size_mb: float, files: int, seed: int, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the cached noisy corpus (``files`` JSONL shards, ``size_mb`` MB in all),
    generated on first use into a temporary directory renamed into place (concurrent or killed
    generations never leave a half corpus under the final name)."""
    from parallax.data.prep import noisy

    source = Path(noisy.__file__).read_bytes()
    # the built-in text is this Python's documentation: another version makes another corpus
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    key = f"noisy-{size_mb:g}mb-{files}f-seed{seed}-{py}-{hashlib.sha256(source).hexdigest()[:12]}"
    root = cache_root(cache_dir)
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
    try:
        noisy.write_noisy_corpus(tmp, size_bytes=int(size_mb * 1e6), files=files, seed=seed)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same corpus first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def corpus_labels(corpus_dir: Path) -> dict[str, tuple[str, str]]:
    """id -> (planted label, the id of the document it copies, or its own id)."""
    labels = {}
    for path in sorted(corpus_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                labels[row["id"]] = (row["planted"], row.get("dup_of", row["id"]))
    return labels


# --------------------------------------------------------------------------------------------
# the two systems (run inside the subprocess)


def _text(doc) -> bytes:
    # datatrove's exact dedup content getter, at module level so workers unpickle it; bytes because its
    # default hash (xxhash) takes only bytes
    return doc.text.encode("utf-8")


def _ids_in(paths: list[Path]) -> list[str]:
    ids = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            ids.extend(json.loads(line)["id"] for line in f)
    return ids


def run_parallax(corpus_dir: Path, work: Path, workers: int) -> dict[str, Any]:
    """parallax's pipeline on ``corpus_dir``; the timed seconds, kept ids and removals per stage."""
    from parallax.data.prep.config import PrepConfig
    from parallax.data.prep.pipeline import run_prep

    out = work / "out"
    config = PrepConfig(input=str(corpus_dir), out=str(out), format=("jsonl",), workers=workers,
                        stages={"language": {"enabled": False}, "toxic": {"enabled": False}})
    t0 = time.perf_counter()
    run_prep(config)
    seconds = time.perf_counter() - t0
    report_dict = json.loads((out / "report.json").read_text(encoding="utf-8")) if (out / "report.json").exists() \
        else {}
    return {"seconds": seconds, "kept_ids": _ids_in(sorted((out / "documents").glob("*.jsonl"))),
            "removed": parallax_removed(report_dict),
            "stage_s": {s["name"]: s.get("seconds", 0.0) for s in report_dict.get("stages", [])},
            "phase_s": {}}


def parallax_removed(report: dict[str, Any]) -> dict[str, int]:
    """Documents removed per stage from parallax's report.json (``stages``: a list of dicts with
    ``name``, ``docs_in`` and ``docs_out``, or a dict name -> such a dict)."""
    stages = report.get("stages", [])
    if isinstance(stages, dict):
        stages = [{"name": name, **value} for name, value in stages.items()]
    return {s["name"]: int(s["docs_in"]) - int(s["docs_out"]) for s in stages
            if "name" in s and "docs_in" in s and "docs_out" in s}


# datatrove's step names -> parallax's stage names (emoji and all, as datatrove spells them)
_DATATROVE_STEPS = {
    "Gopher Repetition": "gopher_repetition",
    "Gopher Quality": "gopher_quality",
    "C4 Quality": "c4",
    "exact-deduplication stage 3": "exact_dedup",
    "MinHash stage 4": "minhash_dedup",
}


def run_datatrove(corpus_dir: Path, work: Path, workers: int) -> dict[str, Any]:
    """datatrove's equivalent pipeline on ``corpus_dir`` (six executor runs, see the module docstring)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    tasks = len(list(corpus_dir.glob("*.jsonl")))
    w = {name: str(work / name) for name in ("filtered", "exact_sigs", "exact_dups", "exact", "mh_sigs",
                                             "mh_buckets", "mh_remove", "out", "logs")}
    exact = ExactDedupConfig(content_getter=_text)
    minhash = MinhashConfig(n_grams=5, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=1)

    def writer(folder: str) -> JsonlWriter:
        return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None)

    phase_s: dict[str, float] = {}

    def execute(name: str, pipeline: list, n_tasks: int) -> Any:
        executor = LocalPipelineExecutor(pipeline=pipeline, tasks=n_tasks, workers=min(workers, n_tasks),
                                         logging_dir=f"{w['logs']}/{name}", skip_completed=False)
        t = time.perf_counter()
        stats = executor.run()
        phase_s[name] = time.perf_counter() - t
        return stats

    t0 = time.perf_counter()
    stats = [execute("1-filter", [JsonlReader(str(corpus_dir), glob_pattern="*.jsonl"), GopherRepetitionFilter(),
                                  GopherQualityFilter(), C4QualityFilter(), writer(w["filtered"]),
                                  ExactDedupSignature(w["exact_sigs"], config=exact)], tasks)]
    _expect_shards(w["filtered"], tasks)
    stats.append(execute("2-exact-find", [ExactFindDedups(w["exact_sigs"], w["exact_dups"], config=exact)], 1))
    stats.append(execute("3-exact-filter", [JsonlReader(w["filtered"]), ExactDedupFilter(w["exact_dups"], config=exact),
                                            writer(w["exact"]), MinhashDedupSignature(w["mh_sigs"], config=minhash)],
                         tasks))
    _expect_shards(w["exact"], tasks)
    stats.append(execute("4-minhash-buckets", [MinhashDedupBuckets(w["mh_sigs"], w["mh_buckets"], config=minhash)],
                         BANDS))
    stats.append(execute("5-minhash-cluster", [MinhashDedupCluster(w["mh_buckets"], w["mh_remove"], config=minhash)],
                         1))
    stats.append(execute("6-minhash-filter-pii", [JsonlReader(w["exact"]), MinhashDedupFilter(w["mh_remove"]),
                                                  PIIFormatter(), writer(w["out"])], tasks))
    seconds = time.perf_counter() - t0
    removed: dict[str, int] = {}
    stage_s: dict[str, float] = {}
    for run_stats in stats:
        for step in json.loads(run_stats.to_json()):
            name = step.get("name", "")
            stage = next((v for k, v in _DATATROVE_STEPS.items() if k in name), None)
            if stage is not None:
                removed[stage] = removed.get(stage, 0) + _stat(step, "dropped")
            # per-step time summed over tasks (CPU seconds, like parallax's report); emoji dropped from names
            key = stage or " ".join(name.encode("ascii", "ignore").decode().split())
            stage_s[key] = stage_s.get(key, 0.0) + float(step.get("time_stats", {}).get("total", 0.0))
    if "exact_dedup" not in removed or "minhash_dedup" not in removed:  # the dedup filters count no "dropped"
        removed.update(_dedup_removed_from_files(w))
    return {"seconds": seconds, "kept_ids": _ids_in(sorted(Path(w["out"]).glob("*.jsonl"))), "removed": removed,
            "stage_s": stage_s, "phase_s": phase_s}


def _stat(step: dict[str, Any], key: str) -> int:
    value = step.get("stats", {}).get(key, 0)
    return int(value.get("total", 0) if isinstance(value, dict) else value)


def _dedup_removed_from_files(w: dict[str, str]) -> dict[str, int]:
    def lines(folder: str) -> int:
        return sum(sum(1 for _ in open(p, encoding="utf-8")) for p in Path(folder).glob("*.jsonl"))

    n_filtered, n_exact, n_out = lines(w["filtered"]), lines(w["exact"]), lines(w["out"])
    return {"exact_dedup": n_filtered - n_exact, "minhash_dedup": n_exact - n_out}


def _expect_shards(folder: str, tasks: int) -> None:
    """datatrove's dedup filters index documents by their position in their task's stream, so every
    task must find its own intermediate file again: a task whose documents were all removed writes no
    file and would shift the others."""
    found = len(list(Path(folder).glob("*.jsonl")))
    if found != tasks:
        raise RuntimeError(f"datatrove: {folder} holds {found} shards for {tasks} tasks (a shard lost all its "
                           f"documents); use a larger --size-mb or fewer --files")


def _child_main(argv: list[str] | None = None) -> None:
    """Inside the measuring subprocess: run one system, write its result as JSON."""
    spec = json.loads((argv or sys.argv)[1])
    run = {"parallax": run_parallax, "datatrove": run_datatrove}[spec["system"]]
    args = (Path(spec["corpus"]), Path(spec["work"]), spec["workers"])
    if spec.get("profile"):
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(run, *args)
        prof = Path(spec["profile"])
        profiler.dump_stats(prof.with_suffix(".prof"))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        prof.with_suffix(".txt").write_text(text.getvalue(), encoding="utf-8")
    else:
        result = run(*args)
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# measuring a subprocess


class TreeMemory:
    """Peaks of the summed RSS and the summed PSS of a process and all its descendants.

    RSS is sampled every ``interval`` seconds; PSS (proportional set size: a page shared by k
    processes counts 1/k in each, so the sum is the tree's real footprint) every ``pss_every``-th
    sample, because reading it costs ~0.5 ms per process (/proc/PID/smaps_rollup). Forked workers
    share their parent's pages (imported modules), which the RSS sum counts once per process.
    """

    def __init__(self, pid: int, interval: float = 0.02, pss_every: int = 5) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._interval = interval
        self._pss_every = pss_every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        tick = 0
        while True:
            try:
                procs = [self._process, *self._process.children(recursive=True)]
            except psutil.Error:
                procs = []
            with_pss = tick % self._pss_every == 0
            rss = pss = 0
            for p in procs:
                try:  # a process may exit between listing and sampling
                    if with_pss:
                        info = p.memory_full_info()
                        pss += getattr(info, "pss", info.rss)  # no PSS outside Linux: RSS
                    else:
                        info = p.memory_info()
                    rss += info.rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            if self._stop.wait(self._interval):
                return

    def stop(self) -> tuple[int, int]:
        """(peak RSS sum, peak PSS sum) in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_rss, self.peak_pss


def run_system(system: str, corpus_dir: Path, workers: int, scratch: Path, profile: Path | None = None
               ) -> dict[str, Any]:
    """One run of ``system`` in a fresh subprocess: its result dict plus ``peak_rss``, ``peak_pss`` (bytes) and
    ``wall_s`` (the subprocess's whole life, imports included)."""
    work = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{system}-"))
    result_path = work / "result.json"
    spec = {"system": system, "corpus": str(corpus_dir), "work": str(work), "workers": workers,
            "result": str(result_path), "profile": str(profile) if profile else None}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TQDM_DISABLE="1")
    log = work / "log.txt"
    try:
        with open(log, "wb") as log_file:
            t0 = time.perf_counter()
            child = subprocess.Popen([sys.executable, "-c", "import sys; from bench.prep import _child_main; "
                                      "_child_main(sys.argv)", json.dumps(spec)],
                                     cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            sampler = TreeMemory(child.pid)
            code = child.wait()
            peak_rss, peak_pss = sampler.stop()
            wall = time.perf_counter() - t0
        if code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(f"{system} failed (exit {code}); end of its log:\n{tail}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**result, "peak_rss": peak_rss, "peak_pss": peak_pss, "wall_s": wall}


# --------------------------------------------------------------------------------------------
# scores


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def label_scores(kept_ids: list[str], labels: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Against the planted labels: the share of clean (and PII) documents kept, of junk documents
    removed, and of exact/near duplicates removed (or their original: one copy per cluster left)."""
    kept = set(kept_ids)
    by_label: dict[str, list[str]] = {}
    for doc_id, (label, _) in labels.items():
        by_label.setdefault(label, []).append(doc_id)
    clean = by_label.get("clean", []) + by_label.get("pii", [])
    junk = [i for label, ids in by_label.items() if label.startswith("junk:") for i in ids]
    dups = by_label.get("exact_dup", []) + by_label.get("near_dup", [])
    # a cluster (original + its copies) ends up right when exactly one member is kept
    clusters: dict[str, list[str]] = {}
    for doc_id in dups:
        clusters.setdefault(labels[doc_id][1], []).append(doc_id)
    for root in clusters:
        clusters[root].append(root)
    # originals that a dedup dropped in favour of a copy do not count against "clean kept"
    kept_or_replaced = {root for root, members in clusters.items() if any(m in kept for m in members)}

    def share(ids: list[str], pred) -> float | None:
        return sum(map(pred, ids)) / len(ids) if ids else None

    return {
        "clean_kept": share(clean, lambda i: i in kept or i in kept_or_replaced),
        "junk_removed": share(junk, lambda i: i not in kept),
        "dups_removed": share(list(clusters), lambda root: sum(m in kept for m in clusters[root]) <= 1),
    }


def cluster_jaccard(a: list[str], b: list[str], labels: dict[str, tuple[str, str]]) -> float:
    """Jaccard similarity of two kept sets with each duplicate replaced by the id of the document it
    copies, as multisets (sum of minimum over sum of maximum counts): keeping a different member of a
    duplicate cluster agrees, keeping two members where the other keeps one does not."""
    ca = Counter(labels[i][1] if i in labels else i for i in a)
    cb = Counter(labels[i][1] if i in labels else i for i in b)
    union = sum((ca | cb).values())
    return sum((ca & cb).values()) / union if union else 1.0


# --------------------------------------------------------------------------------------------
# the benchmark


def _option(ctx, key: str):
    value = getattr(ctx.args, key, None)
    return value if value is not None else (QUICK if ctx.quick else DEFAULT)[key]


def run(ctx) -> Iterator[dict[str, Any]]:
    systems = [s.strip() for s in ctx.args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        raise ValueError(f"--systems: unknown {', '.join(unknown) or '(none given)'}; expected a subset of "
                         f"{','.join(SYSTEMS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = ctx.args.workers or (1 if ctx.quick else min(4, cores))
    files = ctx.args.files or (2 if ctx.quick else max(4, workers))
    size_mb, repeats = float(_option(ctx, "size_mb")), int(_option(ctx, "repeats"))
    for name, value in (("--workers", workers), ("--files", files), ("--repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if size_mb <= 0:
        raise ValueError(f"--size-mb must be > 0, got {size_mb}")
    if files < workers:
        ctx.log(f"WARNING: {files} shards for {workers} workers: both systems parallelise over shards, "
                f"so at most {files} workers are busy")

    for system in list(systems):
        reason = _unavailable(system)
        if reason:
            ctx.skip(system, reason)
            systems.remove(system)
    if not systems:
        return
    ctx.log(f"corpus: {size_mb:g} MB in {files} shards (seed {ctx.args.seed})")
    t0 = time.perf_counter()
    corpus_dir = corpus(size_mb, files, ctx.args.seed, ctx.args.cache_dir)
    ctx.log(f"corpus ready in {time.perf_counter() - t0:.1f} s: {corpus_dir}")
    corpus_bytes = sum(p.stat().st_size for p in corpus_dir.glob("*.jsonl"))
    labels = corpus_labels(corpus_dir)
    ctx.note("pipeline", "gopher_repetition, gopher_quality, c4, exact dedup, MinHash dedup (5-grams, 16 x 8 bands; parallax also verifies candidates by exact Jaccard), "
                         "PII; language and toxic off in both (datatrove's language filter downloads a fastText model)")
    ctx.note("memory", "peaks of the summed RSS (20 ms samples) and summed PSS (100 ms samples) of the run's "
                       "process tree (psutil); RSS counts pages shared by forked workers once per process")

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as scratch:
        for rep in range(repeats):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for system in order:
                r = run_system(system, corpus_dir, workers, Path(scratch))
                ctx.log(f"{system} run {rep + 1}/{repeats}: {r['seconds']:.2f} s, peak RSS "
                        f"{r['peak_rss'] / 1e6:.0f} MB, PSS {r['peak_pss'] / 1e6:.0f} MB, {len(r['kept_ids'])} kept")
                results[system].append(r)
        if ctx.args.profile:
            prof_dir = Path(ctx.args.profile)
            prof_dir.mkdir(parents=True, exist_ok=True)
            for system in systems:
                run_system(system, corpus_dir, workers, Path(scratch), profile=prof_dir / system)
                ctx.log(f"{system} profile written to {prof_dir / system}.txt")

    medians = {s: statistics.median(r["seconds"] for r in rs) for s, rs in results.items()}
    kept = {s: rs[-1]["kept_ids"] for s, rs in results.items()}
    for system, rs in results.items():
        other = next((s for s in systems if s != system), None)
        throughput = corpus_bytes / 1e6 / medians[system]
        row = {
            "system": system, "workers": workers, "files": files, "size_mb": corpus_bytes / 1e6,
            "docs_in": len(labels), "docs_kept": len(kept[system]),
            "median_s": medians[system], "runs_s": [r["seconds"] for r in rs],
            "wall_s": [r["wall_s"] for r in rs],
            "mb_s": throughput, "mb_s_per_core": throughput / workers,
            "peak_rss_mb": statistics.median(r["peak_rss"] for r in rs) / 1e6,
            "peak_pss_mb": statistics.median(r["peak_pss"] for r in rs) / 1e6,
            "removed": rs[-1]["removed"],
            "stage_s": {k: statistics.median(r["stage_s"].get(k, 0.0) for r in rs) for k in rs[-1]["stage_s"]},
            "phase_s": {k: statistics.median(r["phase_s"].get(k, 0.0) for r in rs) for k in rs[-1]["phase_s"]},
            **label_scores(kept[system], labels),
        }
        if "datatrove" in medians and system != "datatrove":
            row["vs_datatrove"] = medians["datatrove"] / medians[system]
        if other is not None:
            row["kept_jaccard"] = jaccard(set(kept[system]), set(kept[other]))
            row["kept_jaccard_clusters"] = cluster_jaccard(kept[system], kept[other], labels)
        yield row
    if "parallax" in medians and "datatrove" in medians:
        ratio = medians["datatrove"] / medians["parallax"]
        ctx.note("goals", {"throughput": f"parallax / datatrove = {ratio:.2f}x (goal >= 2x): "
                                         f"{'met' if ratio >= 2 else 'NOT met'}"})


def _unavailable(system: str) -> str | None:
    """Why ``system`` cannot run here (a missing package or module), or None."""
    import importlib.util

    try:
        if system == "datatrove":
            if importlib.util.find_spec("datatrove") is None:
                return "datatrove is not installed (pip install 'parallax[bench]')"
            if importlib.util.find_spec("spacy") is None:
                return "datatrove's word tokenizer needs spacy (pip install spacy)"
        elif importlib.util.find_spec("parallax.data.prep.pipeline") is None:
            return "parallax.data.prep.pipeline is not in this tree"
    except ModuleNotFoundError as exc:
        return str(exc)
    if importlib.util.find_spec("psutil") is None:
        return "psutil is not installed (pip install 'parallax[bench]')"
    return None

