"""Per-stage tallies of a shard (documents and bytes in and out, counts, time) with the stage's sample of
removed documents, and their merge into the report across shards."""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from parallax.data.prep.report import HEAD_CHARS, StageReport

__all__ = ["Tally", "sample_key", "keep_smallest", "merge_tallies"]


def sample_key(doc_id: str) -> int:
    # Examples are the documents with the smallest hash of their id: spread over the corpus and the same
    # whatever the sharding or worker count.
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class Tally:
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
        keep_smallest(self.heap, self.limit, (sample_key(doc_id), doc_id, reason, text))

    def to_dict(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": self.seconds, "counts": dict(self.counts),
                "samples": sorted((-k, *rest) for k, *rest in self.heap)}


def keep_smallest(heap: list[tuple], limit: int, item: tuple) -> None:
    """Keep in ``heap`` (a max-heap by negated key) the ``limit`` items of smallest key (item[0])."""
    if limit <= 0:
        return
    entry = (-item[0], *item[1:])
    if len(heap) < limit:
        heapq.heappush(heap, entry)
    elif entry > heap[0]:
        heapq.heapreplace(heap, entry)


def merge_tallies(name: str, parts: list[dict[str, Any]], samples: int) -> tuple[StageReport, list[list]]:
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
