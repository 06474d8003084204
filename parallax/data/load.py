"""``load_dataset``: resolve a source, reuse its cached tokens or build them, return a ``TokenDataset``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from parallax.data import cache, prepared
from parallax.data.dataset import TokenDataset
from parallax.data.errors import TokenizerError
from parallax.data.sources import Source, resolve_source
from parallax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["load_dataset"]

log = logging.getLogger(__name__)

# Documents are handed to the tokenizer in batches (the Rust tokenizers library encodes a batch
# in parallel) of at most this many documents or characters, whichever comes first.
_BATCH_DOCS = 512
_BATCH_CHARS = 8 << 20


def load_dataset(path: str | os.PathLike[str] | None = None, *, tokenizer: str | os.PathLike[str] | Tokenizer | None
                 = None, val_fraction: float = 0.1, cache_dir: str | os.PathLike[str] | None = None,
                 insert: Sequence[tuple[str, int]] = (), insert_seed: int = 0) -> TokenDataset:
    """Tokenized dataset for ``path`` (a .txt file, a .jsonl file with a "text" field per line, a
    directory of them, or a directory ``parallax prep`` wrote), or for the built-in corpus (CPython's
    documentation) when ``path`` is None. A prepared directory's tokens are memory-mapped as they are when
    the same tokenizer made them; otherwise its kept documents (``--format jsonl``) are tokenized.

    ``tokenizer`` is anything ``load_tokenizer`` takes: None or ``"byte"`` (the default), a
    tokenizer directory, or a tokenizer object. Documents are encoded without special tokens
    and joined with one ``tokenizer.eot_id`` between them.

    Tokens come from the cache in ``cache_dir`` (default: see ``cache.resolve_cache_dir``) when
    the content and the tokenizer are unchanged; otherwise they are built and cached first. The
    last ``val_fraction`` of the tokens is the 'val' split. Raises ``DataError`` (a
    ``ValueError``) naming the path and the problem for unusable input.

    ``insert``: (text, count) pairs put into the training split only, each ``count`` times as a
    document of its own (its tokens and one ``eot_id``) at document boundaries drawn with
    ``insert_seed`` (e.g. privacy canaries). The validation split stays exactly the one without
    them; the result is cached under a key that covers the insertions.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    tokenizer = load_tokenizer(tokenizer)
    if tokenizer.eot_id is None:
        raise TokenizerError(f"tokenizer {tokenizer.source} has no end-of-text token to separate documents; "
                             "set eos_token in its tokenizer_config.json")
    description = tokenizer.describe()
    root = cache.resolve_cache_dir(cache_dir)
    entry = prepared.prepared_tokens(path, description) if prepared.is_prepared(path) else None
    if entry is not None:
        tokens, meta = entry
        content_hash, description_text = meta["content_hash"], str(Path(path).expanduser())
        bin_path, _ = cache.entry_paths(Path(path).expanduser(), prepared.TOKENS_KEY)
        log.info("data: %s: %d prepared tokens", description_text, len(tokens))
    else:
        if prepared.is_prepared(path):  # prepared with another tokenizer: tokenize its kept documents
            path = prepared.prepared_documents(path, tokenizer.source)
        source = resolve_source(path)
        content_hash, description_text = source.fingerprint(), source.description
        tokens, bin_path = _cached_tokens(source, tokenizer, content_hash, root)
    if insert:
        return _with_insertions(tokens, tokenizer, description_text, content_hash, val_fraction, root, insert,
                                insert_seed)
    return TokenDataset(tokens, tokenizer=tokenizer, source=description_text, val_fraction=val_fraction,
                        content_hash=content_hash, cache_path=str(bin_path))


def _cached_tokens(source: Source, tokenizer: Tokenizer, content_hash: str, root: Path) -> tuple[np.ndarray, Path]:
    """``source``'s tokens from the cache in ``root``, built and cached first on a miss; and the cache file."""
    description = tokenizer.describe()
    key = cache.cache_key(content_hash, description)
    entry = cache.read_entry(root, key)
    if entry is None:
        t0 = time.perf_counter()
        log.info("data: tokenizing %s with %s (cache miss in %s)", source.description, tokenizer.source, root)
        meta = {"source": source.description, "content_hash": content_hash, "tokenizer": description,
                "created_by": f"parallax (Python {platform.python_version()})"}
        dtype = cache.token_dtype(tokenizer.vocab_size)
        cache.write_entry(root, key, _token_chunks(source, tokenizer, dtype), meta, dtype=dtype)
        entry = cache.read_entry(root, key)
        if entry is None:  # only if something removed the entry we just wrote
            raise RuntimeError(f"data cache entry {key} in {root} vanished right after it was written")
        log.info("data: %d tokens in %.2fs", len(entry[0]), time.perf_counter() - t0)
    else:
        log.info("data: %s: %d tokens from cache %s", source.description, len(entry[0]), root)
    return entry[0], cache.entry_paths(root, key)[0]


def _with_insertions(tokens: np.ndarray, tokenizer: Tokenizer, source: str, content_hash: str, val_fraction: float,
                     root: os.PathLike[str], insert: Sequence[tuple[str, int]], seed: int) -> TokenDataset:
    """The dataset of ``tokens`` with the ``insert`` documents added to its training split (cached)."""
    for text, count in insert:
        if not isinstance(text, str) or not text or isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"insert: expected (non-empty text, positive count) pairs; got {(text, count)!r}")
    n_val = TokenDataset(tokens, tokenizer=tokenizer, source=source, val_fraction=val_fraction).num_tokens("val")
    spec = {"base": content_hash, "insert": [list(pair) for pair in insert], "seed": seed, "val_tokens": n_val}
    derived_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    key = cache.cache_key(derived_hash, tokenizer.describe())
    root = Path(root)
    if cache.read_entry(root, key) is None:
        dtype = np.dtype(tokens.dtype)
        meta = {"source": source, "content_hash": derived_hash, "tokenizer": tokenizer.describe(),
                "inserted": spec["insert"], "created_by": f"parallax (Python {platform.python_version()})"}
        chunks = _inserted_chunks(tokens, len(tokens) - n_val, tokenizer, insert, seed, dtype)
        cache.write_entry(root, key, chunks, meta, dtype=dtype)
    entry = cache.read_entry(root, key)
    if entry is None:
        raise RuntimeError(f"data cache entry {key} in {root} vanished right after it was written")
    log.info("data: %d document(s) inserted into the training split of %s", sum(c for _, c in insert), source)
    return TokenDataset(entry[0], tokenizer=tokenizer, source=source, val_tokens=n_val, content_hash=derived_hash,
                        cache_path=str(cache.entry_paths(root, key)[0]))


def _inserted_chunks(tokens: np.ndarray, split_point: int, tokenizer: Tokenizer, insert: Sequence[tuple[str, int]],
                     seed: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """tokens with each inserted text (its tokens + eot) placed ``count`` times at document
    boundaries of tokens[:split_point]: the start, or right after an eot."""
    eot = tokenizer.eot_id
    train = tokens[:split_point]
    boundaries = np.concatenate([[0], np.flatnonzero(train == eot) + 1])  # each <= split_point
    pieces = [np.append(tokenizer.encode_arrays([text])[0], eot).astype(dtype)
              for text, count in insert for _ in range(count)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(pieces)]))
    positions = np.sort(rng.choice(boundaries, size=len(pieces), replace=True))
    order = rng.permutation(len(pieces))  # which piece goes to which position
    previous = 0
    for position, piece in zip(positions, order):
        yield tokens[previous:position]
        yield pieces[piece]
        previous = position
    yield tokens[previous:]


def _token_chunks(source: Source, tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each document's (len,) tokens with one EOT between documents, streamed in batches so the
    whole corpus never has to sit in memory."""
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    first = True
    for batch in _batches(source.documents()):
        for ids in tokenizer.encode_arrays(batch):
            if not first:
                yield eot
            first = False
            yield ids


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
