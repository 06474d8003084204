"""Small stand-ins for the real readers and stages, for the pipeline's own tests (resume, overwrite,
executors): simple enough that every expected count can be worked out by hand, and able to fail on
demand. Importable as ``tests.data.prep.prep_fakes`` so worker processes unpickle them by reference."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from parallax.data.errors import DataError
from parallax.data.prep.document import Document, ReadError, Removed

REGISTRY = {
    "DOCUMENT_STAGES": {"normalize": "tests.data.prep.prep_fakes:Strip",
                        "gopher_quality": "tests.data.prep.prep_fakes:MinWords",
                        "toxic": "tests.data.prep.prep_fakes:Crash"},
    "DEDUP_STAGES": {"exact_dedup": "tests.data.prep.prep_fakes:Exact",
                     "minhash_dedup": "tests.data.prep.prep_fakes:FirstWords"},
    "OUTPUT_STAGES": {"pii": "tests.data.prep.prep_fakes:Emails"},
}


def install(monkeypatch) -> None:
    """Make run_prep use these readers, stages and dedup functions for the rest of the test."""
    from parallax.data.prep import pipeline, stages

    for name, table in REGISTRY.items():
        monkeypatch.setattr(stages, name, table)
    monkeypatch.setattr(pipeline, "_readers", lambda: sys.modules[__name__])
    monkeypatch.setattr(pipeline, "_dedup", lambda: sys.modules[__name__])


# ---- readers: JSONL only


def list_inputs(path) -> list[Path]:
    files = sorted(Path(path).rglob("*.jsonl"))
    if not files:
        raise DataError(f"{path}: no .jsonl file")
    return files


def input_root(path) -> Path:
    return Path(path)


def read_documents(path: Path, *, root: Path, text_field: str = "text", on_error: str = "skip",
                   errors: list[ReadError] | None = None):
    rel = path.relative_to(root).as_posix()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                text = record.pop(text_field)
            except (ValueError, KeyError) as exc:
                if on_error == "fail":
                    raise DataError(f"{path}, line {n}: {exc}") from None
                errors.append(ReadError(str(path), n, f"invalid record: {exc}"))
                continue
            yield Document(f"{rel}:{n}", text, record or None)


# ---- stages


@dataclass(kw_only=True)
class Strip:
    name: ClassVar[str] = "normalize"

    def apply(self, text: str, stats: Counter) -> str | Removed:
        text = text.strip()
        return text if text else Removed("empty after normalisation")


@dataclass(kw_only=True)
class MinWords:
    name: ClassVar[str] = "gopher_quality"
    min_words: int = 3

    def apply(self, text: str, stats: Counter) -> str | Removed:
        n = len(text.split())
        return text if n >= self.min_words else Removed(f"word count {n} < {self.min_words}")


class Boom(RuntimeError):
    pass


# Crash and Emails raise only while ARMED: a test arms them for one run and reruns the same config
# (same fingerprint) disarmed, as after fixing whatever made a real run crash.
ARMED = False


@dataclass(kw_only=True)
class Crash:
    """Keeps everything; while ARMED, raises on a text containing ``on`` (KeyboardInterrupt with
    ``interrupt``)."""
    name: ClassVar[str] = "toxic"
    on: str | None = None
    interrupt: bool = False

    def apply(self, text: str, stats: Counter) -> str | Removed:
        if ARMED and self.on is not None and self.on in text:
            raise KeyboardInterrupt if self.interrupt else Boom(f"crash on {self.on}")
        return text


_EMAIL = re.compile(r"\S+@\S+\.\w+")


@dataclass(kw_only=True)
class Emails:
    name: ClassVar[str] = "pii"
    crash_on: str | None = None

    def apply(self, text: str, stats: Counter) -> str:
        if ARMED and self.crash_on is not None and self.crash_on in text:
            raise Boom(f"crash on {self.crash_on}")
        text, n = _EMAIL.subn("<EMAIL>", text)
        if n:
            stats["email"] += n
        return text


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(kw_only=True)
class Exact:
    name: ClassVar[str] = "exact_dedup"

    def keys(self, texts) -> np.ndarray:
        return np.array([_hash(t) for t in texts], dtype=np.uint64)


def exact_duplicates(keys) -> list[np.ndarray]:
    seen: set[int] = set()
    out = []
    for shard in keys:
        drop = np.zeros(len(shard), dtype=bool)
        for i, k in enumerate(shard.tolist()):
            drop[i] = k in seen
            seen.add(k)
        out.append(drop)
    return out


def _band_drops(column: np.ndarray) -> np.ndarray:
    _, first = np.unique(column, return_index=True)
    drop = np.ones(len(column), dtype=bool)
    drop[first] = False
    return drop


@dataclass(kw_only=True)
class FirstWords:
    """'Near duplicates': documents sharing their first 4 words (band 0) or their last 4 (band 1)."""
    name: ClassVar[str] = "minhash_dedup"
    bands: ClassVar[int] = 2

    def band_keys(self, texts) -> np.ndarray:
        return np.array([[_hash(" ".join(t.split()[:4])), _hash(" ".join(t.split()[-4:]))] for t in texts],
                        dtype=np.uint64).reshape(-1, 2)

    def near_duplicates(self, band_keys, map_fn=None) -> list[np.ndarray]:
        every = np.concatenate(band_keys)
        drops = map_fn(_band_drops, [every[:, j] for j in range(every.shape[1])])
        drop = np.logical_or.reduce(drops)
        return np.split(drop, np.cumsum([len(k) for k in band_keys])[:-1])


# ---- a corpus with planted junk

FILES = 5
DOCS_PER_FILE = 24


def _words(i: int, n: int) -> str:
    return " ".join(f"w{i}x{j}" for j in range(n))


def write_corpus(root: Path) -> list[str]:
    """FILES JSONL files with planted junk; returns the texts the fake stages keep, in order (e-mail
    addresses already replaced)."""
    root.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    normal: list[str] = []
    for f in range(FILES):
        lines = []
        for k in range(DOCS_PER_FILE):
            i = f * DOCS_PER_FILE + k
            kind = i % 8
            if kind == 1:
                text = "  \n "  # normalize removes it
            elif kind == 2:
                text = f"tiny {i}"  # 2 words < 3: gopher_quality removes it
            elif kind == 3 and normal:
                text = normal[(i * 7) % len(normal)]  # exact copy of an earlier kept document
            elif kind == 5 and normal:
                base = normal[(i * 3) % len(normal)].split()
                text = " ".join(base[:4] + [f"n{i}y{j}" for j in range(6)])  # first 4 words shared
            elif kind == 6:
                text = f"{_words(i, 6)} write to u{i}@example.com today"
                kept.append(f"{_words(i, 6)} write to <EMAIL> today")
                normal.append(text)
            else:
                text = f"  {_words(i, 5 + i % 7)}  "
                kept.append(text.strip())
                normal.append(text.strip())
            lines.append(json.dumps({"text": text, "n": i}))
        (root / f"{chr(ord('a') + f)}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return kept


# ---- executor probes (module level: picklable by reference)


def square_or_fail(x: int) -> int:
    if x < 0:
        raise DataError(f"negative item {x}")
    return x * x


def interrupt_parent(x: int) -> int:
    """Ctrl-C as a terminal sends it: SIGINT to the driver while the workers are busy."""
    import os
    import signal
    import time

    if x == 0:
        os.kill(os.getppid(), signal.SIGINT)
    time.sleep(30)
    return x
