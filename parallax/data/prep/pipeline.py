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
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parallax.data import cache
from parallax.data.errors import DataError, TokenizerError
from parallax.data.prep import stages as registry
from parallax.data.prep.config import PrepConfig
from parallax.data.prep.dedup import exact_duplicates
from parallax.data.prep.executors import make_executor
from parallax.data.prep.files import atomic_file, read_json, write_json
from parallax.data.prep.readers import input_root, list_inputs
from parallax.data.prep.report import Report
from parallax.data.prep.scan import MAX_READ_ERRORS, ScanTask, scan_paths, scan_shard
from parallax.data.prep.tally import merge_tallies
from parallax.data.prep.write import (
    WriteTask,
    shard_paths,
    shard_tokenizer,
    write_shard,
)

__all__ = ["run_prep", "FORMAT", "OWN_NAMES"]

log = logging.getLogger(__name__)

FORMAT = "parallax.prep/1"
# What a prep run owns in its output directory; --overwrite replaces these and nothing else.
OWN_NAMES = ("prep.json", "tokens.bin", "tokens.json", "documents", "samples", "report.json", "report.html", ".work")
_MERGE_CHUNK = 1 << 24  # tokens copied at a time when merging the shards' tokens
_OUTPUTS = ("tokens.bin", "tokens.json", "samples", "report.json", "report.html", "documents")


def find_duplicates(work: Path, n_shards: int, exact: Any | None, minhash: Any | None, map_fn: Any) -> None:
    """Write ``.work/dedup.npz``: per shard, ``exact_NNNNN`` and ``near_NNNNN`` (n_i,) bool, True = drop."""
    target = work / "dedup.npz"
    if target.exists():
        return
    keys = []
    for index in range(n_shards):
        with np.load(scan_paths(work, index)[1]) as data:
            keys.append({name: data[name] for name in data.files})
    sizes = [json.loads(scan_paths(work, i)[2].read_text(encoding="utf-8"))["kept"] for i in range(n_shards)]
    drop_exact = [np.zeros(n, dtype=bool) for n in sizes]
    drop_near = [np.zeros(n, dtype=bool) for n in sizes]
    t0 = time.perf_counter()
    if exact is not None and sum(sizes):
        drop_exact = [np.asarray(m, dtype=bool) for m in exact_duplicates([k["exact"] for k in keys])]
    t1 = time.perf_counter()
    if minhash is not None and sum(sizes):
        survivors = [k["bands"][~d] for k, d in zip(keys, drop_exact)]
        signatures = [k["signatures"][~d] for k, d in zip(keys, drop_exact)] if "signatures" in keys[0] else None
        near = minhash.near_duplicates(survivors, map_fn=map_fn, signatures=signatures,
                                       texts=_ScanTexts(work, drop_exact))
        for d, n, m in zip(drop_exact, drop_near, near):
            n[~d] = np.asarray(m, dtype=bool)
    seconds = np.array([t1 - t0, time.perf_counter() - t1])  # the exact and MinHash parts of this phase
    with atomic_file(target, binary=True) as f:
        np.savez(f, seconds=seconds, **{f"exact_{i:05d}": m for i, m in enumerate(drop_exact)},
                 **{f"near_{i:05d}": m for i, m in enumerate(drop_near)})


class _ScanTexts:
    """The texts of documents given by their index among all shards' exact-dedup survivors, read back
    from the scan files (only the lines asked for are parsed: the MinHash candidates, a small share)."""

    def __init__(self, work: Path, drop_exact: list[np.ndarray]):
        self.work = work
        self.lines = [np.flatnonzero(~d) for d in drop_exact]  # survivor -> its line in the shard's scan file
        self.offsets = np.cumsum([0] + [len(x) for x in self.lines])

    def __call__(self, indices: np.ndarray) -> list[str]:
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        texts: dict[int, str] = {}
        for shard in np.unique(shard_of).tolist():
            wanted = indices[shard_of == shard]
            by_line = dict(zip(self.lines[shard][wanted - self.offsets[shard]].tolist(), wanted.tolist()))
            with open(scan_paths(self.work, shard)[0], encoding="utf-8") as f:
                for number, line in enumerate(f):
                    if number in by_line:
                        texts[by_line[number]] = json.loads(line)[1]
        return [texts[i] for i in indices.tolist()]


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
        todo = [i for i in range(len(plan.shards)) if not scan_paths(plan.work, i)[2].exists()]
        log.info("prep: scanning %d of %d shard(s)", len(todo), len(plan.shards))
        executor.map(scan_shard, [
            ScanTask(index=i, path=str(plan.shards[i]), root=str(plan.root), work=str(plan.work),
                      text_field=config.text_field, on_error=config.on_error, samples=config.samples,
                      stages=plan.doc_stages, exact=plan.exact, minhash=plan.minhash) for i in todo])
        find_duplicates(plan.work, len(plan.shards), plan.exact, plan.minhash, executor.map)
        with np.load(plan.work / "dedup.npz") as masks:
            dedup_seconds = masks["seconds"].tolist()
            todo = [i for i in range(len(plan.shards)) if not shard_paths(plan.work, i)[2].exists()]
            log.info("prep: writing %d of %d shard(s)", len(todo), len(plan.shards))
            tasks = [WriteTask(index=i, work=str(plan.work), drop_exact=masks[f"exact_{i:05d}"],
                                drop_near=masks[f"near_{i:05d}"], exact=plan.exact is not None,
                                minhash=plan.minhash is not None, pii=plan.pii, tokenizer=config.tokenizer,
                                formats=config.format, samples=config.samples) for i in todo]
        executor.map(write_shard, tasks)
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


def _plan(config: PrepConfig) -> _Plan | None:
    """Resolve inputs, build the stages, check the output directory; None when it is already complete."""
    if config.input is None:
        raise DataError("input: no input given; pass --input PATH (a file, a directory or a glob pattern)")
    shards = list_inputs(config.input)
    root = Path(input_root(config.input)).resolve()
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
        tokenizer = shard_tokenizer(config.tokenizer)
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

    prep = read_json(out / "prep.json")
    state = read_json(work / "state.json")
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
    write_json(work / "state.json", {"format": FORMAT, "fingerprint": fingerprint})
    return plan


def _finish(config: PrepConfig, plan: _Plan, dedup_seconds: list[float], elapsed: float) -> Report:
    """Phase 4: report, samples and merged tokens into .work/final, then swap them into the output."""
    work, out, final = plan.work, plan.out, plan.work / "final"
    n = len(plan.shards)
    scans = [json.loads(scan_paths(work, i)[2].read_text(encoding="utf-8")) for i in range(n)]
    writes = [json.loads(shard_paths(work, i)[2].read_text(encoding="utf-8")) for i in range(n)]
    report = Report(input=config.input, out=config.out, shards=n, executor=config.executor, workers=config.workers,
                    docs_read=sum(s["docs_read"] for s in scans), bytes_read=sum(s["bytes_read"] for s in scans),
                    docs_kept=sum(w["docs_kept"] for w in writes), bytes_kept=sum(w["bytes_kept"] for w in writes),
                    read_errors=[e for s in scans for e in s["read_errors"]][:MAX_READ_ERRORS],
                    read_errors_total=sum(s["read_errors_total"] for s in scans))
    removed = []
    names = [name for name, _ in plan.doc_stages]
    for name in names:
        stage, examples = merge_tallies(name, [s["stages"][name] for s in scans], config.samples)
        report.stages.append(stage)
        removed.extend([name, *e[1:]] for e in examples)
    for name, built in (("exact_dedup", plan.exact), ("minhash_dedup", plan.minhash), ("pii", plan.pii)):
        if built is not None:
            stage, examples = merge_tallies(name, [w["stages"][name] for w in writes], config.samples)
            if name != "pii":  # key hashing in the scan + the cross-shard pass
                stage.seconds += sum(s["key_seconds"][name] for s in scans) + dedup_seconds[name == "minhash_dedup"]
            report.stages.append(stage)
            removed.extend([name, *e[1:]] for e in examples)
    kept = sorted(e for w in writes for e in w["kept"])[:config.samples]

    ready = read_json(final / "ready.json")
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
        with atomic_file(final / "samples" / "kept.jsonl") as f:
            for _, doc_id, text in kept:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        with atomic_file(final / "samples" / "removed.jsonl") as f:
            for name, doc_id, reason, text in removed:
                f.write(json.dumps({"stage": name, "id": doc_id, "reason": reason, "text": text},
                                   ensure_ascii=False) + "\n")
        report.elapsed_s = elapsed
        with atomic_file(final / "report.json") as f:
            f.write(report.to_json())
        with atomic_file(final / "report.html") as f:
            f.write(report.to_html())
        produced = ["samples", "report.json", "report.html"]
        produced += ["tokens.bin", "tokens.json"] if report.tokens else []
        produced += ["documents"] if "jsonl" in config.format else []
        ready = {"produced": produced}
        write_json(final / "ready.json", ready)
    else:
        report = Report.from_dict(json.loads(_first_existing(final / "report.json", out / "report.json")))

    # Swap: prep.json says "incomplete" first, so a crash mid-swap is resumed (a move already done is
    # skipped), never mistaken for a complete output. Outputs of an earlier run this one does not
    # produce (e.g. documents/ without "jsonl") are removed.
    write_json(out / "prep.json", {"format": FORMAT, "fingerprint": plan.fingerprint, "complete": False})
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
    write_json(out / "prep.json", {"format": FORMAT, "fingerprint": plan.fingerprint, "complete": True,
                                    "input": config.input, "shards": [p.relative_to(plan.root).as_posix()
                                                                      for p in plan.shards],
                                    "config": config.fingerprint_fields(), "tokenizer": plan.tokenizer_desc,
                                    "tokens": report.tokens,
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
        path = shard_paths(work, i)[1]
        if left <= 0 or not path.exists() or path.stat().st_size == 0:
            continue
        tokens = np.memmap(path, dtype=dtype, mode="r")[:left]  # a shard is a whole input file: stream it
        for start in range(0, tokens.size, _MERGE_CHUNK):
            yield tokens[start:start + _MERGE_CHUNK]
        left -= tokens.size
