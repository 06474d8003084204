"""On-disk token cache: one ``<key>.bin`` of little-endian tokens plus a ``<key>.json`` sidecar.

Tokens are uint16 when the vocabulary fits (< 65536 ids, e.g. bytes, GPT-2, Llama 2) and uint32
otherwise (Llama 3, Qwen); the sidecar records which. The key is a hash of the source content
and the tokenizer's description, so editing the data or changing the tokenizer (another one,
or an edited tokenizer.json) misses the cache instead of reading stale tokens. Both files are written to
temporary names in the cache directory and moved into place with ``os.replace``; the sidecar
moves last and is the commit marker, so a reader either sees a complete entry or none.
Several processes (e.g. ranks) may build the same entry at once: the contents are identical
and each replace is atomic, so every one of them ends up reading a whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from parallax.data.errors import DataError

__all__ = [
    "TOKEN_DTYPES", "FORMAT_VERSION", "token_dtype", "resolve_cache_dir", "cache_key", "entry_paths", "read_entry",
    "write_entry",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the file layout changes; old entries then simply miss
# Fixed byte order so a cache copied between machines reads the same.
TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest cache dtype holding every id below ``vocab_size``."""
    return next(d for d in TOKEN_DTYPES if vocab_size <= np.iinfo(d).max + 1)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding token caches: ``cache_dir`` if given, else ``$PARALLAX_CACHE_DIR/data``,
    else ``$XDG_CACHE_HOME/parallax/data`` (``~/.cache/parallax/data`` by default).

    ``PARALLAX_CACHE_DIR`` names parallax's cache root, shared by any other part that caches.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("PARALLAX_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "data"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "parallax" / "data"


def cache_key(content_hash: str, tokenizer_desc: dict[str, Any]) -> str:
    """Cache key for ``content_hash`` tokenized by the tokenizer ``tokenizer_desc`` describes."""
    ident = json.dumps({"format": FORMAT_VERSION, "content": content_hash, "tokenizer": tokenizer_desc}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def entry_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(tokens ``.bin``, sidecar ``.json``) paths of the entry ``key``."""
    return cache_dir / f"{key}.bin", cache_dir / f"{key}.json"


def read_entry(cache_dir: Path, key: str) -> tuple[np.memmap, dict[str, Any]] | None:
    """The cached tokens, a read-only (N,) uint16 or uint32 memmap (the sidecar's ``dtype``), and
    the sidecar; ``None`` on a miss.

    An entry that is incomplete or inconsistent (e.g. left by a killed process between the
    two moves) counts as a miss and is rebuilt over, with a warning.
    """
    bin_path, meta_path = entry_paths(cache_dir, key)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("data cache: ignoring unreadable %s (%s); rebuilding", meta_path, exc)
        return None
    n = meta.get("num_tokens") if isinstance(meta, dict) else None
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    if (not isinstance(n, int) or n <= 0 or meta.get("format") != FORMAT_VERSION or meta.get("key") != key
            or dtype not in [d.str for d in TOKEN_DTYPES]):
        log.warning("data cache: ignoring %s (unexpected contents); rebuilding", meta_path)
        return None
    dtype = np.dtype(dtype)
    try:
        size = bin_path.stat().st_size
    except FileNotFoundError:
        log.warning("data cache: %s has no %s; rebuilding", meta_path.name, bin_path.name)
        return None
    if size != n * dtype.itemsize:
        log.warning("data cache: %s holds %d bytes, expected %d; rebuilding", bin_path, size, n * dtype.itemsize)
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)), meta


def write_entry(cache_dir: Path, key: str, chunks: Iterable[np.ndarray], meta: dict[str, Any],
                dtype: np.dtype = TOKEN_DTYPES[0]) -> int:
    """Stream token ``chunks`` (1-D non-negative integer arrays) into the entry ``key`` as
    ``dtype`` (one of ``TOKEN_DTYPES``), with ``meta`` plus ``format``/``key``/``num_tokens``/
    ``dtype`` as its sidecar.

    Returns the token count. An id that ``dtype`` cannot hold raises ``ValueError`` (never a
    silent wrap-around). If anything fails, including the ``chunks`` iterator itself, the
    temporary files are removed and no entry (and no partial file) is left behind.
    """
    dtype = np.dtype(dtype)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {[d.str for d in TOKEN_DTYPES]}, got {dtype.str}")
    limit = np.iinfo(dtype).max
    cache_dir.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = entry_paths(cache_dir, key)
    tmp_bin = tmp_meta = None
    try:
        tmp_bin = _mkstemp(cache_dir, key, ".bin")
        n = 0
        with open(tmp_bin, "wb") as f:
            for chunk in chunks:
                if chunk.size and (chunk.min() < 0 or chunk.max() > limit):
                    bad = chunk.min() if chunk.min() < 0 else chunk.max()
                    raise ValueError(f"{meta.get('source', key)}: token id {bad} does not fit the cache dtype "
                                     f"{dtype.str}")
                arr = np.ascontiguousarray(chunk, dtype=dtype)
                f.write(memoryview(arr).cast("B"))
                n += arr.size
            f.flush()
            os.fsync(f.fileno())  # data on disk before the name appears, so a power cut cannot expose a hole
        if n == 0:
            raise DataError(f"{meta.get('source', key)}: contains no text (0 tokens)")
        full_meta = {**meta, "format": FORMAT_VERSION, "key": key, "num_tokens": n, "dtype": dtype.str}
        tmp_meta = _mkstemp(cache_dir, key, ".json")
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        # Tokens first, sidecar last: the sidecar is what readers look for.
        os.replace(tmp_bin, bin_path)
        tmp_bin = None
        os.replace(tmp_meta, meta_path)
        tmp_meta = None
    finally:
        for tmp in (tmp_bin, tmp_meta):
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
    log.info("data cache: wrote %d tokens to %s", n, bin_path)
    return n


def _mkstemp(cache_dir: Path, key: str, suffix: str) -> Path:
    # Same directory as the final file so os.replace is a rename, never a cross-device copy.
    fd, name = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=f"{suffix}.tmp")
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes 0600; a shared cache should be readable by others
    return Path(name)
