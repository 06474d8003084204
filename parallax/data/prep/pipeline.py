"""``run_prep(config) -> Report``: the preparation pipeline, in four phases over shards (one per input file).

1. scan (per shard, in parallel): read, run the per-document stages, write the kept documents and
   their dedup keys (content hash, MinHash band keys) to ``DIR/.work/scan/``.
2. dedup (across all shards): exact duplicates, then MinHash near duplicates of the exact survivors;
   the per-band work goes through the executor's ``map``, every band task sees the keys of all shards.
3. write (per shard, in parallel): drop the duplicates, scrub PII, tokenize (one EOT between documents,
   as ``parallax.data.load_dataset`` does), write the shard's documents and tokens under ``DIR/.work/``.
4. finish: merge the tokens into ``DIR/tokens.bin`` + ``tokens.json`` (the token cache's sidecar, so
   ``parallax.data.cache.read_entry(DIR, "tokens")`` memory-maps it), write the samples and the report,
   then move everything into ``DIR`` and mark ``DIR/prep.json`` complete.

Every file is written under a temporary name and ``os.replace``'d, and each shard's marker (its JSON
summary) is written last, so a crash or Ctrl-C leaves whole files only: the next run with the same
config and output directory finds the finished shards and never rewrites them. The new output replaces
an earlier one only at the very end, so a failed run leaves an earlier complete output in place.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np

from parallax.data import cache
from parallax.data.errors import DataError, TokenizerError
from parallax.data.prep import stages as registry
from parallax.data.prep.config import PrepConfig
from parallax.data.prep.document import Removed
from parallax.data.prep.executors import make_executor
from parallax.data.prep.report import HEAD_CHARS, Report, StageReport

__all__ = ["run_prep", "FORMAT", "OWN_NAMES"]

log = logging.getLogger(__name__)

FORMAT = "parallax.prep/1"
# What a prep run owns in its output directory; --overwrite replaces these and nothing else.
OWN_NAMES = ("prep.json", "tokens.bin", "tokens.json", "documents", "samples", "report.json", "report.html", ".work")
MAX_READ_ERRORS = 100  # read errors listed per shard, and in the report (all are counted)
_OUTPUTS = ("tokens.bin", "tokens.json", "samples", "report.json", "report.html", "documents")
_KEY_BATCH = 1024  # documents per dedup-key batch (bounds memory per shard; keys are vectorised per batch)
_TOKEN_BATCH = 256  # documents per tokenizer call


def _readers() -> Any:
    from parallax.data.prep import readers

    return readers


def _dedup() -> Any:
    from parallax.data.prep import dedup

    return dedup


# ---------------------------------------------------------------- small helpers


@contextmanager
def _atomic(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it is synced and renamed to ``path``, on any
    failure (Ctrl-C included) removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    with _atomic(path) as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _sample_key(doc_id: str) -> int:
    # Examples are the documents with the smallest hash of their id: spread over the corpus and the same
    # whatever the sharding or worker count.
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class _Tally:
    """One stage's counts within one shard, plus its ``limit`` sample candidates (id-hash order)."""

    limit: int
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    heap: list[tuple[int, str, str, str]] = field(default_factory=list)  # (-key, id, reason, text)

    def sample(self, doc_id: str, reason: str, text: str) -> None:
        _keep_smallest(self.heap, self.limit, (_sample_key(doc_id), doc_id, reason, text))

    def to_dict(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": self.seconds, "counts": dict(self.counts),
                "samples": sorted((-k, *rest) for k, *rest in self.heap)}


def _keep_smallest(heap: list[tuple], limit: int, item: tuple) -> None:
    """Keep in ``heap`` (a max-heap by negated key) the ``limit`` items of smallest key (item[0])."""
    if limit <= 0:
        return
    entry = (-item[0], *item[1:])
    if len(heap) < limit:
        heapq.heappush(heap, entry)
    elif entry > heap[0]:
        heapq.heapreplace(heap, entry)


# ---------------------------------------------------------------- phase 1: scan


class _CappedErrors(list):
    """The reader's error list: keeps the first ``MAX_READ_ERRORS`` and counts the rest (a file of
    millions of bad lines must not fill the memory or the report)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def append(self, error: Any) -> None:
        self.total += 1
        if len(self) < MAX_READ_ERRORS:
            super().append(error)


@dataclass
class _ScanTask:
    index: int
    path: str
    root: str
    work: str
    text_field: str
    on_error: str
    samples: int
    stages: list[tuple[str, Any]]
    exact: Any | None
    minhash: Any | None


def _scan_paths(work: Path, index: int) -> tuple[Path, Path, Path]:
    base = work / "scan" / f"{index:05d}"
    return base.with_suffix(".jsonl"), base.with_suffix(".npz"), base.with_suffix(".json")


def _scan_shard(task: _ScanTask) -> None:
    """Read shard ``task.index``, run the document stages; write its kept documents ([id, text, meta] per
    line), their dedup keys and, last, its summary (the marker)."""
    readers = _readers()
    docs_path, keys_path, marker = _scan_paths(Path(task.work), task.index)
    tallies = [(name, stage, _Tally(task.samples)) for name, stage in task.stages]
    errors = _CappedErrors()
    exact_keys: list[np.ndarray] = []
    band_keys: list[np.ndarray] = []
    signatures: list[np.ndarray] = []
    verify = task.minhash is not None and getattr(task.minhash, "verify", False)
    batch: list[str] = []
    docs_read = bytes_read = kept = 0

    key_seconds = {"exact_dedup": 0.0, "minhash_dedup": 0.0}

    def flush() -> None:
        t0 = time.perf_counter()
        if task.exact is not None:
            exact_keys.append(np.asarray(task.exact.keys(batch), dtype=np.uint64))
        t1 = time.perf_counter()
        if verify:  # the Jaccard check in phase 2 needs the signatures themselves
            signatures.append(task.minhash.signatures(batch))
            band_keys.append(task.minhash.band_keys(signatures[-1]))
        elif task.minhash is not None:
            band_keys.append(np.asarray(task.minhash.band_keys(batch), dtype=np.uint64))
        key_seconds["exact_dedup"] += t1 - t0
        key_seconds["minhash_dedup"] += time.perf_counter() - t1
        batch.clear()

    perf = time.perf_counter
    with _atomic(docs_path) as out:
        for doc in readers.read_documents(Path(task.path), root=Path(task.root), text_field=task.text_field,
                                          on_error=task.on_error, errors=errors):
            text = doc.text
            size = _nbytes(text)
            docs_read += 1
            bytes_read += size
            for _, stage, tally in tallies:
                tally.docs_in += 1
                tally.bytes_in += size
                t0 = perf()
                result = stage.apply(text, tally.counts)
                tally.seconds += perf() - t0
                if isinstance(result, Removed):
                    tally.sample(doc.id, result.reason, text)
                    break
                if result is not text:
                    text = result
                    size = _nbytes(text)
                tally.docs_out += 1
                tally.bytes_out += size
            else:
                out.write(json.dumps([doc.id, text, doc.meta], ensure_ascii=False))
                out.write("\n")
                kept += 1
                batch.append(text)
                if len(batch) >= _KEY_BATCH:
                    flush()
        if batch:
            flush()
    with _atomic(keys_path, binary=True) as f:
        arrays = {}
        if task.exact is not None:
            arrays["exact"] = np.concatenate(exact_keys) if exact_keys else np.zeros(0, np.uint64)
        if task.minhash is not None:
            bands = task.minhash.bands
            arrays["bands"] = np.concatenate(band_keys) if band_keys else np.zeros((0, bands), np.uint64)
        if verify:
            arrays["signatures"] = (np.concatenate(signatures) if signatures
                                    else np.zeros((0, task.minhash.num_perm), np.uint64))
        np.savez(f, **arrays)
    _write_json(marker, {"path": task.path, "docs_read": docs_read, "bytes_read": bytes_read, "kept": kept,
                         "stages": {name: tally.to_dict() for name, _, tally in tallies}, "key_seconds": key_seconds,
                         "read_errors": [{"path": e.path, "line": e.line, "message": e.message} for e in errors],
                         "read_errors_total": errors.total})


# ---------------------------------------------------------------- phase 2: dedup


def _find_duplicates(work: Path, n_shards: int, exact: Any | None, minhash: Any | None, map_fn: Any) -> None:
    """Write ``.work/dedup.npz``: per shard, ``exact_NNNNN`` and ``near_NNNNN`` (n_i,) bool, True = drop."""
    target = work / "dedup.npz"
    if target.exists():
        return
    keys = []
    for index in range(n_shards):
        with np.load(_scan_paths(work, index)[1]) as data:
            keys.append({name: data[name] for name in data.files})
    sizes = [json.loads(_scan_paths(work, i)[2].read_text(encoding="utf-8"))["kept"] for i in range(n_shards)]
    drop_exact = [np.zeros(n, dtype=bool) for n in sizes]
    drop_near = [np.zeros(n, dtype=bool) for n in sizes]
    t0 = time.perf_counter()
    if exact is not None and sum(sizes):
        drop_exact = [np.asarray(m, dtype=bool) for m in _dedup().exact_duplicates([k["exact"] for k in keys])]
    t1 = time.perf_counter()
    if minhash is not None and sum(sizes):
        survivors = [k["bands"][~d] for k, d in zip(keys, drop_exact)]
        if "signatures" in keys[0]:
            near = minhash.near_duplicates(survivors, map_fn=map_fn,
                                           signatures=[k["signatures"][~d] for k, d in zip(keys, drop_exact)])
        else:
            near = minhash.near_duplicates(survivors, map_fn=map_fn)
        for d, n, m in zip(drop_exact, drop_near, near):
            n[~d] = np.asarray(m, dtype=bool)
    seconds = np.array([t1 - t0, time.perf_counter() - t1])  # the exact and MinHash parts of this phase
    with _atomic(target, binary=True) as f:
        np.savez(f, seconds=seconds, **{f"exact_{i:05d}": m for i, m in enumerate(drop_exact)},
                 **{f"near_{i:05d}": m for i, m in enumerate(drop_near)})


# ---------------------------------------------------------------- phase 3: write


@dataclass
class _WriteTask:
    index: int
    work: str
    drop_exact: np.ndarray
    drop_near: np.ndarray
    exact: bool
    minhash: bool
    pii: Any | None
    tokenizer: str | None
    formats: tuple[str, ...]
    samples: int


@lru_cache(maxsize=4)
def _tokenizer(spec: str | None) -> Any:
    from parallax.data.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def _shard_paths(work: Path, index: int) -> tuple[Path, Path, Path]:
    name = f"{index:05d}"
    return work / "documents" / f"{name}.jsonl", work / "tokens" / f"{name}.bin", work / "shards" / f"{name}.json"


def _write_shard(task: _WriteTask) -> None:
    """Drop shard ``task.index``'s duplicates, scrub PII and write its documents (JSONL) and tokens (each
    document's ids followed by one EOT); its summary, written last, is the marker."""
    work = Path(task.work)
    docs_out, tokens_out, marker = _shard_paths(work, task.index)
    stats = {}
    exact = _Tally(task.samples) if task.exact else None
    near = _Tally(task.samples) if task.minhash else None
    pii = _Tally(task.samples) if task.pii is not None else None
    kept: list[tuple[int, str, str, str]] = []
    write_docs = "jsonl" in task.formats
    tokenizer = _tokenizer(task.tokenizer) if "tokens" in task.formats else None
    dtype = cache.token_dtype(tokenizer.vocab_size) if tokenizer is not None else None
    n_tokens = docs_kept = bytes_kept = 0
    pending: list[str] = []

    def encode(tokens: IO[bytes]) -> int:
        eot = np.array([tokenizer.eot_id], dtype=dtype)
        n = 0
        for ids in tokenizer.encode_arrays(pending):
            ids = np.asarray(ids).astype(dtype, copy=False)
            tokens.write(ids.tobytes())
            tokens.write(eot.tobytes())
            n += ids.size + 1
        pending.clear()
        return n

    perf = time.perf_counter
    with open(_scan_paths(work, task.index)[0], encoding="utf-8") as scan, \
            _atomic(docs_out) if write_docs else _null() as documents, \
            _atomic(tokens_out, binary=True) if tokenizer is not None else _null() as tokens:
        for i, line in enumerate(scan):
            doc_id, text, meta = json.loads(line)
            size = _nbytes(text)
            dropped = False
            for tally, drop, reason in ((exact, task.drop_exact, "exact duplicate of an earlier document"),
                                        (near, task.drop_near, "near duplicate (MinHash LSH) of an earlier document")):
                if tally is None:
                    continue
                tally.docs_in += 1
                tally.bytes_in += size
                if drop[i]:
                    tally.sample(doc_id, reason, text)
                    dropped = True
                    break
                tally.docs_out += 1
                tally.bytes_out += size
            if dropped:
                continue
            if pii is not None:
                pii.docs_in += 1
                pii.bytes_in += size
                t0 = perf()
                result = task.pii.apply(text, pii.counts)
                pii.seconds += perf() - t0
                if isinstance(result, Removed):  # the PII contract never removes; respect it if one does
                    pii.sample(doc_id, result.reason, text)
                    continue
                if result is not text:
                    text = result
                    size = _nbytes(text)
                pii.docs_out += 1
                pii.bytes_out += size
            docs_kept += 1
            bytes_kept += size
            _keep_smallest(kept, task.samples, (_sample_key(doc_id), doc_id, text))
            if documents is not None:
                record = dict(meta) if meta else {}
                record["text"] = text
                documents.write(json.dumps(record, ensure_ascii=False))
                documents.write("\n")
            if tokens is not None:
                pending.append(text)
                if len(pending) >= _TOKEN_BATCH:
                    n_tokens += encode(tokens)
        if tokens is not None and pending:
            n_tokens += encode(tokens)
    for name, tally in (("exact_dedup", exact), ("minhash_dedup", near), ("pii", pii)):
        if tally is not None:
            stats[name] = tally.to_dict()
    _write_json(marker, {"stages": stats, "docs_kept": docs_kept, "bytes_kept": bytes_kept, "tokens": n_tokens,
                         "kept": sorted((-k, *rest) for k, *rest in kept)})


@contextmanager
def _null() -> Iterator[None]:
    yield None


# ---------------------------------------------------------------- the run


@dataclass
class _Plan:
    out: Path
    work: Path
    root: Path
    shards: list[Path]
    fingerprint: str
    doc_stages: list[tuple[str, Any]]
    exact: Any | None
    minhash: Any | None
    pii: Any | None
    tokenizer_desc: dict[str, Any] | None
    dtype: np.dtype | None


def run_prep(config: PrepConfig) -> Report:
    """Run the pipeline ``config`` describes; returns its report (also in ``config.out``/report.json).

    Raises ``DataError`` (a ValueError) for unusable input or an output directory that needs
    ``overwrite``, ValueError for a bad stage option. A run interrupted in any way resumes on the next
    call with the same config and output directory. When ``config.out`` already holds the complete
    output of the same config and input, nothing is recomputed: its report is returned.
    """
    t0 = time.perf_counter()
    plan = _plan(config)
    if plan is None:
        report = Report.from_dict(json.loads((Path(config.out) / "report.json").read_text(encoding="utf-8")))
        log.info("prep: %s already holds this run's complete output", config.out)
        return report
    executor = make_executor(config.executor, config.workers, config.ray_address)
    try:
        todo = [i for i in range(len(plan.shards)) if not _scan_paths(plan.work, i)[2].exists()]
        log.info("prep: scanning %d of %d shard(s)", len(todo), len(plan.shards))
        executor.map(_scan_shard, [
            _ScanTask(index=i, path=str(plan.shards[i]), root=str(plan.root), work=str(plan.work),
                      text_field=config.text_field, on_error=config.on_error, samples=config.samples,
                      stages=plan.doc_stages, exact=plan.exact, minhash=plan.minhash) for i in todo])
        _find_duplicates(plan.work, len(plan.shards), plan.exact, plan.minhash, executor.map)
        with np.load(plan.work / "dedup.npz") as masks:
            dedup_seconds = masks["seconds"].tolist()
            todo = [i for i in range(len(plan.shards)) if not _shard_paths(plan.work, i)[2].exists()]
            log.info("prep: writing %d of %d shard(s)", len(todo), len(plan.shards))
            tasks = [_WriteTask(index=i, work=str(plan.work), drop_exact=masks[f"exact_{i:05d}"],
                                drop_near=masks[f"near_{i:05d}"], exact=plan.exact is not None,
                                minhash=plan.minhash is not None, pii=plan.pii, tokenizer=config.tokenizer,
                                formats=config.format, samples=config.samples) for i in todo]
        executor.map(_write_shard, tasks)
    finally:
        executor.close()
    return _finish(config, plan, dedup_seconds, time.perf_counter() - t0)


def _fingerprint(config: PrepConfig, root: Path, shards: list[Path], tokenizer_desc: dict[str, Any] | None,
                 stages: dict[str, str]) -> str:
    """What decides the output: the config's output options, every stage with all its thresholds (its
    repr, defaults included, so a changed default is a different run), the tokenizer and the input
    files (path, size, modification time: cheap at any corpus size, unlike hashing the content)."""
    listing = []
    for path in shards:
        st = path.stat()
        listing.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    ident = {"format": FORMAT, "config": config.fingerprint_fields(), "stages": stages, "tokenizer": tokenizer_desc,
             "input": listing}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _plan(config: PrepConfig) -> _Plan | None:
    """Resolve inputs, build the stages, check the output directory; None when it is already complete."""
    if config.input is None:
        raise DataError("input: no input given; pass --input PATH (a file, a directory or a glob pattern)")
    readers = _readers()
    shards = readers.list_inputs(config.input)
    root = Path(readers.input_root(config.input)).resolve()
    out = Path(config.out).resolve()
    if out == root or root in out.parents:
        raise DataError(f"out {config.out} is inside the input directory {root}; its output would become input")
    if out.exists() and not out.is_dir():
        raise DataError(f"out {config.out} is a file; expected a directory (new or from an earlier prep run)")
    doc_stages = [(name, stage) for name in registry.DOCUMENT_STAGES
                  if (stage := registry.build_stage(name, config.stages.get(name))) is not None]
    exact = registry.build_stage("exact_dedup", config.stages.get("exact_dedup"))
    minhash = registry.build_stage("minhash_dedup", config.stages.get("minhash_dedup"))
    pii = registry.build_stage("pii", config.stages.get("pii"))
    tokenizer_desc = dtype = None
    if "tokens" in config.format:
        tokenizer = _tokenizer(config.tokenizer)
        if tokenizer.eot_id is None:
            raise TokenizerError(f"tokenizer {tokenizer.source} has no end-of-text token to separate documents; "
                                 "set eos_token in its tokenizer_config.json")
        tokenizer_desc = tokenizer.describe()
        dtype = cache.token_dtype(tokenizer.vocab_size)
    built = [*doc_stages, ("exact_dedup", exact), ("minhash_dedup", minhash), ("pii", pii)]
    fingerprint = _fingerprint(config, root, [Path(p).resolve() for p in shards], tokenizer_desc,
                               {name: repr(stage) for name, stage in built})
    work = out / ".work"
    plan = _Plan(out=out, work=work, root=root, shards=[Path(p).resolve() for p in shards], fingerprint=fingerprint,
                 doc_stages=doc_stages, exact=exact, minhash=minhash, pii=pii, tokenizer_desc=tokenizer_desc,
                 dtype=dtype)

    prep = _read_json(out / "prep.json")
    state = _read_json(work / "state.json")
    if state is not None and state.get("fingerprint") == fingerprint and not config.overwrite:
        log.info("prep: resuming the run in %s", out)
        return plan
    if (prep is not None and prep.get("format") == FORMAT and prep.get("fingerprint") == fingerprint
            and prep.get("complete") and state is None and not config.overwrite):
        return None
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_NAMES) if out.is_dir() else []
    other_run = ((prep is not None and prep.get("fingerprint") != fingerprint)
                 or (state is not None and state.get("fingerprint") != fingerprint)
                 or ((out / "prep.json").exists() and (prep is None or prep.get("format") != FORMAT)))
    if (foreign or other_run) and not config.overwrite:
        what = " and ".join(
            ([f"files that are not a prep output ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"]
             if foreign else []) + (["the output of another prep run (different config or input)"] if other_run else []))
        raise DataError(f"out {config.out} holds {what}; pass --overwrite (overwrite=True) to replace it "
                        "(only prep's own files are replaced)")
    if work.exists():
        shutil.rmtree(work)
    for sub in ("scan", "documents", "tokens", "shards", "final"):
        (work / sub).mkdir(parents=True)
    _write_json(work / "state.json", {"format": FORMAT, "fingerprint": fingerprint})
    return plan


def _merge_tallies(name: str, parts: list[dict[str, Any]], samples: int) -> tuple[StageReport, list[list]]:
    """One stage's report from its per-shard tallies, and its sample examples [key, id, reason, text]."""
    stage = StageReport(name=name)
    counts: Counter[str] = Counter()
    examples = []
    for part in parts:
        stage.docs_in += part["docs_in"]
        stage.docs_out += part["docs_out"]
        stage.bytes_in += part["bytes_in"]
        stage.bytes_out += part["bytes_out"]
        stage.seconds += part["seconds"]
        counts.update(part["counts"])
        examples.extend(part["samples"])
    examples = sorted(examples)[:samples]
    stage.counts = dict(sorted(counts.items()))
    stage.removed = [{"id": e[1], "reason": e[2], "text": e[3][:HEAD_CHARS]} for e in examples]
    return stage, examples


def _finish(config: PrepConfig, plan: _Plan, dedup_seconds: list[float], elapsed: float) -> Report:
    """Phase 4: report, samples and merged tokens into .work/final, then swap them into the output."""
    work, out, final = plan.work, plan.out, plan.work / "final"
    n = len(plan.shards)
    scans = [json.loads(_scan_paths(work, i)[2].read_text(encoding="utf-8")) for i in range(n)]
    writes = [json.loads(_shard_paths(work, i)[2].read_text(encoding="utf-8")) for i in range(n)]
    report = Report(input=config.input, out=config.out, shards=n, executor=config.executor, workers=config.workers,
                    docs_read=sum(s["docs_read"] for s in scans), bytes_read=sum(s["bytes_read"] for s in scans),
                    docs_kept=sum(w["docs_kept"] for w in writes), bytes_kept=sum(w["bytes_kept"] for w in writes),
                    read_errors=[e for s in scans for e in s["read_errors"]][:MAX_READ_ERRORS],
                    read_errors_total=sum(s["read_errors_total"] for s in scans))
    removed = []
    names = [name for name, _ in plan.doc_stages]
    for name in names:
        stage, examples = _merge_tallies(name, [s["stages"][name] for s in scans], config.samples)
        report.stages.append(stage)
        removed.extend([name, *e[1:]] for e in examples)
    for name, built in (("exact_dedup", plan.exact), ("minhash_dedup", plan.minhash), ("pii", plan.pii)):
        if built is not None:
            stage, examples = _merge_tallies(name, [w["stages"][name] for w in writes], config.samples)
            if name != "pii":  # key hashing in the scan + the cross-shard pass
                stage.seconds += sum(s["key_seconds"][name] for s in scans) + dedup_seconds[name == "minhash_dedup"]
            report.stages.append(stage)
            removed.extend([name, *e[1:]] for e in examples)
    kept = sorted(e for w in writes for e in w["kept"])[:config.samples]

    ready = _read_json(final / "ready.json")
    if ready is None:
        total = sum(w["tokens"] for w in writes)
        if "tokens" in config.format and total > 1:
            meta = {"source": f"parallax prep {config.input}", "content_hash": plan.fingerprint,
                    "tokenizer": plan.tokenizer_desc, "created_by": f"parallax prep (Python {platform.python_version()})"}
            report.tokens = cache.write_entry(final, "tokens", _merged_tokens(work, n, total - 1, plan.dtype), meta,
                                              dtype=plan.dtype)
        elif "tokens" in config.format:
            log.warning("prep: no document was kept; no tokens written")
        (final / "samples").mkdir(exist_ok=True)
        with _atomic(final / "samples" / "kept.jsonl") as f:
            for _, doc_id, text in kept:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        with _atomic(final / "samples" / "removed.jsonl") as f:
            for name, doc_id, reason, text in removed:
                f.write(json.dumps({"stage": name, "id": doc_id, "reason": reason, "text": text},
                                   ensure_ascii=False) + "\n")
        report.elapsed_s = elapsed
        with _atomic(final / "report.json") as f:
            f.write(report.to_json())
        with _atomic(final / "report.html") as f:
            f.write(report.to_html())
        produced = ["samples", "report.json", "report.html"]
        produced += ["tokens.bin", "tokens.json"] if report.tokens else []
        produced += ["documents"] if "jsonl" in config.format else []
        ready = {"produced": produced}
        _write_json(final / "ready.json", ready)
    else:
        report = Report.from_dict(json.loads(_first_existing(final / "report.json", out / "report.json")))

    # Swap: prep.json says "incomplete" first, so a crash mid-swap is resumed (a move already done is
    # skipped), never mistaken for a complete output. Outputs of an earlier run this one does not
    # produce (e.g. documents/ without "jsonl") are removed.
    _write_json(out / "prep.json", {"format": FORMAT, "fingerprint": plan.fingerprint, "complete": False})
    for name in _OUTPUTS:
        source, target = (work if name == "documents" else final) / name, out / name
        if name in ready["produced"] and not source.exists():
            continue  # moved by an earlier, interrupted finish
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if name in ready["produced"]:
            os.replace(source, target)
    _write_json(out / "prep.json", {"format": FORMAT, "fingerprint": plan.fingerprint, "complete": True,
                                    "input": config.input, "shards": [p.relative_to(plan.root).as_posix()
                                                                      for p in plan.shards],
                                    "config": config.fingerprint_fields(), "tokens": report.tokens,
                                    "docs_kept": report.docs_kept})
    shutil.rmtree(work)
    return report


def _first_existing(*paths: Path) -> str:
    for path in paths:
        if path.exists():
            return path.read_text(encoding="utf-8")
    raise DataError(f"{paths[0]}: missing; rerun with --overwrite")


def _merged_tokens(work: Path, n_shards: int, total: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The shards' tokens in order, the first ``total`` of them (all but the last document's EOT)."""
    left = total
    for i in range(n_shards):
        path = _shard_paths(work, i)[1]
        if left <= 0 or not path.exists() or path.stat().st_size == 0:
            continue
        tokens = np.fromfile(path, dtype=dtype)
        yield tokens[:left]
        left -= min(left, tokens.size)
