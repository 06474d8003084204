"""Phase 3 of ``run_prep``, one shard per task: drop the shard's duplicates, scrub PII, and write its kept
documents (JSONL) and tokens under ``DIR/.work/``; its summary, written last, is the marker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np

from parallax.data import cache
from parallax.data.prep.document import Removed
from parallax.data.prep.files import atomic_file, utf8_size, write_json
from parallax.data.prep.scan import scan_paths
from parallax.data.prep.tally import Tally, keep_smallest, sample_key

__all__ = ["TOKEN_BATCH", "WriteTask", "shard_paths", "shard_tokenizer", "write_shard"]

TOKEN_BATCH = 256  # documents per tokenizer call


@dataclass
class WriteTask:
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
def shard_tokenizer(spec: str | None) -> Any:
    from parallax.data.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def shard_paths(work: Path, index: int) -> tuple[Path, Path, Path]:
    name = f"{index:05d}"
    return work / "documents" / f"{name}.jsonl", work / "tokens" / f"{name}.bin", work / "shards" / f"{name}.json"


def write_shard(task: WriteTask) -> None:
    """Drop shard ``task.index``'s duplicates, scrub PII and write its documents (JSONL) and tokens (each
    document's ids followed by one EOT); its summary, written last, is the marker."""
    work = Path(task.work)
    docs_out, tokens_out, marker = shard_paths(work, task.index)
    stats = {}
    exact = Tally(task.samples) if task.exact else None
    near = Tally(task.samples) if task.minhash else None
    pii = Tally(task.samples) if task.pii is not None else None
    kept: list[tuple[int, str, str, str]] = []
    write_docs = "jsonl" in task.formats
    tokenizer = shard_tokenizer(task.tokenizer) if "tokens" in task.formats else None
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
    with open(scan_paths(work, task.index)[0], encoding="utf-8") as scan, \
            atomic_file(docs_out) if write_docs else _nothing() as documents, \
            atomic_file(tokens_out, binary=True) if tokenizer is not None else _nothing() as tokens:
        for i, line in enumerate(scan):
            doc_id, text, meta = json.loads(line)
            size = utf8_size(text)
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
                    size = utf8_size(text)
                pii.docs_out += 1
                pii.bytes_out += size
            docs_kept += 1
            bytes_kept += size
            keep_smallest(kept, task.samples, (sample_key(doc_id), doc_id, text))
            if documents is not None:
                record = dict(meta) if meta else {}
                record["text"] = text
                documents.write(json.dumps(record, ensure_ascii=False))
                documents.write("\n")
            if tokens is not None:
                pending.append(text)
                if len(pending) >= TOKEN_BATCH:
                    n_tokens += encode(tokens)
        if tokens is not None and pending:
            n_tokens += encode(tokens)
    for name, tally in (("exact_dedup", exact), ("minhash_dedup", near), ("pii", pii)):
        if tally is not None:
            stats[name] = tally.to_dict()
    write_json(marker, {"stages": stats, "docs_kept": docs_kept, "bytes_kept": bytes_kept, "tokens": n_tokens,
                         "kept": sorted((-k, *rest) for k, *rest in kept)})


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
