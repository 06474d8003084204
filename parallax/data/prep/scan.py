"""Phase 1 of ``run_prep``, one shard (input file) per task: read it, run the per-document stages, and write
the kept documents, their dedup keys and, last (the marker), the shard's tallies under ``DIR/.work/scan/``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parallax.data.prep.document import Removed
from parallax.data.prep.files import atomic_file, utf8_size, write_json
from parallax.data.prep.readers import read_documents
from parallax.data.prep.tally import Tally

__all__ = ["MAX_READ_ERRORS", "KEY_BATCH", "ScanTask", "scan_paths", "scan_shard"]

MAX_READ_ERRORS = 100  # read errors listed per shard, and in the report (all are counted)
KEY_BATCH = 1024  # documents per dedup-key batch (bounds memory per shard; keys are vectorised per batch)


class CappedErrors(list):
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
class ScanTask:
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


def scan_paths(work: Path, index: int) -> tuple[Path, Path, Path]:
    base = work / "scan" / f"{index:05d}"
    return base.with_suffix(".jsonl"), base.with_suffix(".npz"), base.with_suffix(".json")


def scan_shard(task: ScanTask) -> None:
    """Read shard ``task.index``, run the document stages; write its kept documents ([id, text, meta] per
    line), their dedup keys and, last, its summary (the marker)."""
    docs_path, keys_path, marker = scan_paths(Path(task.work), task.index)
    tallies = [(name, stage, Tally(task.samples)) for name, stage in task.stages]
    errors = CappedErrors()
    exact_keys: list[np.ndarray] = []
    band_keys: list[np.ndarray] = []
    signatures: list[np.ndarray] = []
    verify = task.minhash is not None and task.minhash.verify == "signature"
    batch: list[str] = []
    docs_read = bytes_read = kept = 0

    key_seconds = {"exact_dedup": 0.0, "minhash_dedup": 0.0}

    def flush() -> None:
        t0 = time.perf_counter()
        if task.exact is not None:
            exact_keys.append(np.asarray(task.exact.keys(batch), dtype=np.uint64))
        t1 = time.perf_counter()
        if verify:  # the estimate check in phase 2 needs the signatures themselves
            signatures.append(task.minhash.signatures(batch))
            band_keys.append(task.minhash.band_keys(signatures[-1]))
        elif task.minhash is not None:
            band_keys.append(np.asarray(task.minhash.band_keys(batch), dtype=np.uint64))
        key_seconds["exact_dedup"] += t1 - t0
        key_seconds["minhash_dedup"] += time.perf_counter() - t1
        batch.clear()

    perf = time.perf_counter
    with atomic_file(docs_path) as out:
        for doc in read_documents(Path(task.path), root=Path(task.root), text_field=task.text_field,
                                          on_error=task.on_error, errors=errors):
            text = doc.text
            size = utf8_size(text)
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
                    size = utf8_size(text)
                tally.docs_out += 1
                tally.bytes_out += size
            else:
                out.write(json.dumps([doc.id, text, doc.meta], ensure_ascii=False))
                out.write("\n")
                kept += 1
                batch.append(text)
                if len(batch) >= KEY_BATCH:
                    flush()
        if batch:
            flush()
    with atomic_file(keys_path, binary=True) as f:
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
    write_json(marker, {"path": task.path, "docs_read": docs_read, "bytes_read": bytes_read, "kept": kept,
                         "stages": {name: tally.to_dict() for name, _, tally in tallies}, "key_seconds": key_seconds,
                         "read_errors": [{"path": e.path, "line": e.line, "message": e.message} for e in errors],
                         "read_errors_total": errors.total})
