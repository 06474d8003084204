"""``load_dataset``: resolve a source, reuse its cached tokens or build them, return a ``TokenDataset``."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterator

import numpy as np

from parallax.data import cache
from parallax.data.dataset import TokenDataset
from parallax.data.sources import Source, resolve_source
from parallax.data.tokenizer import ByteTokenizer

__all__ = ["load_dataset"]

log = logging.getLogger(__name__)


def load_dataset(path: str | os.PathLike[str] | None = None, *, val_fraction: float = 0.1,
                 cache_dir: str | os.PathLike[str] | None = None) -> TokenDataset:
    """Tokenized dataset for ``path`` (a .txt file, a .jsonl file with a "text" field per line, or a
    directory of them), or for the built-in corpus (CPython's documentation) when ``path`` is None.

    Tokens come from the cache in ``cache_dir`` (default: see ``cache.resolve_cache_dir``) when
    the content is unchanged; otherwise they are built and cached first. The last
    ``val_fraction`` of the tokens is the 'val' split. Raises ``DataError`` (a ``ValueError``)
    naming the path and the problem for unusable input.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    tokenizer = ByteTokenizer()
    source = resolve_source(path)
    root = cache.resolve_cache_dir(cache_dir)
    content_hash = source.fingerprint()
    key = cache.cache_key(content_hash, tokenizer.describe())

    entry = cache.read_entry(root, key)
    if entry is None:
        t0 = time.perf_counter()
        log.info("data: tokenizing %s (cache miss in %s)", source.description, root)
        meta = {"source": source.description, "content_hash": content_hash, "tokenizer": tokenizer.describe(),
                "created_by": f"parallax (Python {platform.python_version()})"}
        cache.write_entry(root, key, _token_chunks(source, tokenizer), meta)
        entry = cache.read_entry(root, key)
        if entry is None:  # only if something removed the entry we just wrote
            raise RuntimeError(f"data cache entry {key} in {root} vanished right after it was written")
        log.info("data: %d tokens in %.2fs", len(entry[0]), time.perf_counter() - t0)
    else:
        log.info("data: %s: %d tokens from cache %s", source.description, len(entry[0]), root)
    tokens, _ = entry
    bin_path, _ = cache.entry_paths(root, key)
    return TokenDataset(tokens, tokenizer=tokenizer, source=source.description, val_fraction=val_fraction,
                        content_hash=content_hash, cache_path=str(bin_path))


def _token_chunks(source: Source, tokenizer: ByteTokenizer) -> Iterator[np.ndarray]:
    """Each document's (len,) uint16 tokens with one EOT between documents, streamed so the
    whole corpus never has to sit in memory."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint16)
    for i, doc in enumerate(source.documents()):
        if i:
            yield eot
        yield tokenizer.encode_array(doc)
