"""Exact and near-duplicate removal across all shards of a corpus.

Exact: a 64-bit BLAKE2b content hash per document; the first occurrence in global order (shard order,
then document order) is kept.

Near duplicates: MinHash signatures over word n-gram shingles, locality-sensitive hashing in bands, and
connected components over the documents that share a band, keeping the lowest global index of each
component. The signatures equal ``datasketch.MinHash(num_perm, seed, scheme=...)`` updated with the same
shingles element-wise, the default (b, r) is datasketch's ``_optimal_param`` and two documents are
candidates exactly when datasketch's ``MinHashLSH`` with the same parameters would return one for the
other (any identical band). By default every candidate pair is a duplicate (datasketch's answer): the
banding S-curve 1 - (1 - s^r)^b decides, so at threshold 0.8 with 128 permutations (b=9, r=13) a pair at
Jaccard 0.9 is found with probability 0.93, one at 0.8 with 0.40 and one at 0.7 with 0.08. ``verify``
adds a check of each candidate against its bucket's anchor with the signatures' Jaccard estimate, which
removes most of that tail below the threshold (precision 1.0 instead of 0.96 at J >= 0.75 in the tests).

Shingles: the text is lower-cased and split on Unicode whitespace (``str.split()``); shingle i is the
words i..i+ngram-1 joined by single spaces and encoded UTF-8. A document with fewer than ``ngram`` words
is one shingle of all its words; an empty document has no shingles, so its signature is all max values
(as an un-updated datasketch MinHash), and all empty documents are duplicates of each other.

Speed (one core of the shared 2-core build machine, the built-in corpus x6, 128 permutations; the range is
load from other jobs): the default shingle hash is SHA-1 (datasketch's ``sha1_hash32``, needed for equal
signatures) at 4.2-7.3 MB/s of text, most of it in Python per shingle (join + SHA-1 ~ 0.9 us);
``shingle_hash = "words"`` hashes each distinct word once (BLAKE2b, cached) and combines the n-gram's word
hashes in numpy: 8.9-17 MB/s, 2.1-2.3x faster, but not datasketch's hash, so it is an option and SHA-1
stays the default. The permutations and minimum (numpy, uint32, [num_perm, shingles] blocks) take
~25 ms per MB of text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "ExactDedup",
    "exact_duplicates",
    "MinHashDedup",
    "optimal_bands",
    "default_map",
    "shingles",
    "connected_components",
]

_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH32 = np.uint64((1 << 32) - 1)
_SCHEMES = ("affine32", "legacy")
_SHINGLE_HASHES = ("sha1", "words")
# "words" mode: each process caches word -> 64-bit hash (natural text repeats its words: most lookups hit);
# the cache is cleared past this many entries (~100 MB).
_WORD_CACHE_SIZE = 1 << 20
# Columns of the [num_perm, shingles] permutation matrix computed at once: 32768 x 128 x 8 bytes = 32 MiB
# of temporaries at most, whatever the document sizes.
_BLOCK_ROWS = 1 << 15
# Shingle hashes buffered before they are permuted: large blocks amortise numpy's per-call overhead.
_FLUSH_SHINGLES = 1 << 16


def default_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """The builtin map, as a list: the in-process stand-in for an executor's map."""
    return list(map(fn, items))


# --------------------------------------------------------------------------------------------- exact


@dataclass(kw_only=True)
class ExactDedup:
    """Exact duplicate removal by content hash (the text after the document stages)."""

    name: ClassVar[str] = "exact_dedup"
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"[exact_dedup] enabled must be true or false, got {self.enabled!r}")

    def keys(self, texts: Sequence[str]) -> np.ndarray:
        """[n] uint64: the first 8 bytes (little-endian) of each text's BLAKE2b digest over its UTF-8.

        A 64-bit key makes a false match between two different texts in a corpus of n documents
        about n^2 / 2^65 likely (1e-9 for 200,000 documents).
        """
        digests = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
            digests.append(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest())
        return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


def exact_duplicates(keys: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per shard, a [n_i] bool mask, True = drop: every copy of a key after its first occurrence in
    global order (shard 0's documents, then shard 1's, ...)."""
    flat = _concat_1d(keys, "keys")
    drop = np.ones(flat.shape[0], dtype=bool)
    _, first = np.unique(flat, return_index=True)
    drop[first] = False
    return _split(drop, [k.shape[0] for k in keys])


# ------------------------------------------------------------------------------------------ minhash


def optimal_bands(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """datasketch's ``_optimal_param``: the (bands, rows) with b * r <= num_perm minimising
    w_fp * (integral over [0, t] of P(candidate | s)) + w_fn * (integral over [t, 1] of P(missed | s)),
    P(candidate | s) = 1 - (1 - s^r)^b; the first minimum in (b, r) order wins, as in datasketch.

    datasketch integrates with scipy's adaptive quadrature; the integrands are polynomials of degree
    b * r <= num_perm, so Gauss-Legendre with num_perm // 2 + 1 nodes integrates them exactly (to float
    rounding) without scipy.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if not isinstance(num_perm, int) or num_perm < 1:
        raise ValueError(f"num_perm must be a positive integer, got {num_perm!r}")
    b = np.concatenate([np.full(num_perm // i, i) for i in range(1, num_perm + 1)]).astype(np.float64)
    r = np.concatenate([np.arange(1, num_perm // i + 1) for i in range(1, num_perm + 1)]).astype(np.float64)
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def integral(lo: float, hi: float, missed: bool) -> np.ndarray:
        s = (hi - lo) / 2 * x + (hi + lo) / 2  # nodes mapped from [-1, 1] to [lo, hi]
        p_missed = (1.0 - s[None, :] ** r[:, None]) ** b[:, None]  # [pairs, nodes]
        f = p_missed if missed else 1.0 - p_missed
        return (hi - lo) / 2 * (f @ w)

    error = weights[0] * integral(0.0, threshold, False) + weights[1] * integral(threshold, 1.0, True)
    best = int(np.argmin(error))
    return int(b[best]), int(r[best])


def shingles(text: str, ngram: int) -> list[bytes]:
    """The UTF-8 word ``ngram``-grams of ``text`` (lower-cased, split on whitespace, joined by one
    space), in order, repeats included; one shingle of all words when there are fewer than ``ngram``."""
    words = [w.encode("utf-8") for w in text.lower().split()]
    if len(words) <= ngram:
        return [b" ".join(words)] if words else []
    return list(map(b" ".join, zip(*(words[i:] for i in range(ngram)))))


class _WordHashes(dict):
    """word -> the first 8 bytes (little-endian) of BLAKE2b(word UTF-8), computed on first use."""

    def __missing__(self, word: str) -> int:
        value = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        self[word] = value
        return value


_WORD_HASHES = _WordHashes()


def _word_shingle_hashes(w: np.ndarray, n_words: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The "words" shingle hash: h = 0, then h = fmix64(h xor word_hash) for each word of the shingle in
    order, then the top 32 bits of h; word_hash = the first 8 bytes (little-endian) of BLAKE2b(word UTF-8).

    For a batch of documents: ``w`` [total words] uint64 word hashes,
    ``n_words`` [docs] their counts per document. Returns ([total shingles] uint32, [docs] shingles per
    document), shingles in document order (max(n - ngram + 1, 1) of them for n > 0 words, none for 0)."""
    n_shingles = np.where(n_words > 0, np.maximum(n_words - ngram + 1, 1), 0)
    doc_start = np.cumsum(n_words) - n_words
    owner = np.repeat(np.arange(n_words.shape[0]), n_shingles)
    # Position of each shingle's first word: its document's start plus its rank within the document.
    pos = doc_start[owner] + np.arange(owner.shape[0]) - (np.cumsum(n_shingles) - n_shingles)[owner]
    length = np.minimum(n_words, ngram)[owner]  # words in each shingle (< ngram for short documents)
    h = np.zeros(owner.shape[0], dtype=np.uint64)
    for k in range(ngram):
        inside = k < length
        h = np.where(inside, _fmix64(h ^ w[np.where(inside, pos + k, 0)]), h)
    return (h >> np.uint64(32)).astype(np.uint32), n_shingles


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch's affine32 pre-mix), wrapping uint32 arithmetic."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection on uint64 that spreads every input bit."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@dataclass(kw_only=True)
class MinHashDedup:
    """Near-duplicate removal with MinHash + LSH (see the module docstring for the exact definitions).

    ``bands``/``rows`` default to datasketch's optimal (b, r) for ``threshold`` and ``num_perm`` with
    weights (0.5, 0.5); give both to override. ``scheme`` is datasketch's permutation scheme:
    "affine32" (its default since 2.0: murmur pre-mix, then a * h + b mod 2^32) or "legacy"
    ((a * h + b) mod (2^61 - 1), masked to 32 bits, with datasketch's uint64 wrap-around before the mod).
    """

    name: ClassVar[str] = "minhash_dedup"
    enabled: bool = True
    num_perm: int = 128  # the 128 permutations (datasketch's and datatrove's default size)
    ngram: int = 5  # word 5-grams (the issue; Gopher/FineWeb use 5-gram shingles)
    threshold: float = 0.8  # Jaccard threshold (the default)
    bands: int | None = None
    rows: int | None = None
    seed: int = 1  # datasketch's default seed
    scheme: str = "affine32"
    shingle_hash: str = "sha1"  # "sha1": datasketch's hash; "words": faster, not datasketch-equal
    verify: bool = False  # False: any shared band is a duplicate (datasketch's MinHashLSH answer)

    def __post_init__(self) -> None:
        for field in ("num_perm", "ngram", "seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if field == "seed" else 1):
                raise ValueError(f"[minhash_dedup] {field} must be a {'non-negative' if field == 'seed' else 'positive'} integer, got {value!r}")
        if self.num_perm < 2:
            raise ValueError(f"[minhash_dedup] num_perm must be >= 2, got {self.num_perm}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"[minhash_dedup] threshold must be a number in (0, 1], got {self.threshold!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"[minhash_dedup] verify must be true or false, got {self.verify!r}")
        if self.shingle_hash not in _SHINGLE_HASHES:
            raise ValueError(
                f"[minhash_dedup] shingle_hash must be one of {', '.join(_SHINGLE_HASHES)}, got {self.shingle_hash!r}"
            )
        if self.scheme not in _SCHEMES:
            raise ValueError(f"[minhash_dedup] scheme must be one of {', '.join(_SCHEMES)}, got {self.scheme!r}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("[minhash_dedup] bands and rows must be given together (or neither, for the optimum)")
        if self.bands is None:
            self.bands, self.rows = optimal_bands(float(self.threshold), self.num_perm)
        for field in ("bands", "rows"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"[minhash_dedup] {field} must be a positive integer, got {value!r}")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"[minhash_dedup] bands * rows = {self.bands} * {self.rows} must be <= num_perm = {self.num_perm}"
            )
        gen = np.random.RandomState(self.seed)  # datasketch's _init_permutations, draw for draw
        if self.scheme == "affine32":
            self._a = gen.randint(0, 1 << 31, self.num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
            self._b = gen.randint(0, 1 << 32, self.num_perm, dtype=np.uint32)
        else:
            ab = [
                (gen.randint(1, _MERSENNE_PRIME, dtype=np.uint64), gen.randint(0, _MERSENNE_PRIME, dtype=np.uint64))
                for _ in range(self.num_perm)
            ]
            self._a, self._b = np.array(ab, dtype=np.uint64).T.copy()
        # Per-position constants of the band hash (fixed, independent of `seed`).
        self._band_salt = np.random.RandomState(0x5EED).randint(0, 1 << 63, self.rows, dtype=np.uint64)

    # -- signatures --------------------------------------------------------------------------------

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """[n, num_perm] uint64 MinHash signatures. With ``shingle_hash = "sha1"`` they equal element-wise
        datasketch's ``MinHash(num_perm, seed, scheme=scheme)`` updated with ``shingles(text, ngram)``;
        with "words" they equal it with ``hashfunc`` = the "words" hash of ``_word_shingle_hashes`` over each
        shingle's words (the tests check both)."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, got one string")
        sig = np.full((len(texts), self.num_perm), _MAX_HASH32, dtype=np.uint64)
        sha1, by_words = hashlib.sha1, self.shingle_hash == "words"
        items: list[Any] = []  # SHA-1 digests per shingle, or 64-bit hashes per word
        counts: list[int] = []  # per buffered document: its shingles, or its words
        first = 0  # index of the document counts[0] belongs to
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
            if by_words:
                words = text.lower().split()
                items.extend(map(_WORD_HASHES.__getitem__, words))
                counts.append(len(words))
            else:
                grams = shingles(text, self.ngram)
                items.extend([sha1(g).digest() for g in grams])
                counts.append(len(grams))
            if len(items) >= _FLUSH_SHINGLES:
                self._flush(sig, first, counts, items)
                first, counts, items = i + 1, [], []
                if len(_WORD_HASHES) > _WORD_CACHE_SIZE:
                    _WORD_HASHES.clear()
        self._flush(sig, first, counts, items)
        return sig

    def _flush(self, sig: np.ndarray, first: int, counts: list[int], items: list[Any]) -> None:
        """Min the permuted hashes of the buffered shingles into ``sig`` rows first.., in column blocks."""
        if not items:
            return
        if self.shingle_hash == "words":
            hv, counts = _word_shingle_hashes(np.array(items, dtype=np.uint64), np.array(counts), self.ngram)
        else:
            # sha1_hash32: the digest's first 4 bytes, little-endian (20-byte digests = 5 uint32 each).
            hv = np.frombuffer(b"".join(items), dtype="<u4")[::5]
        doc = np.repeat(np.arange(first, first + len(counts)), counts)  # [shingles] document of each
        if self.scheme == "affine32":
            hv = _fmix32(hv.astype(np.uint32))
        else:
            hv = hv.astype(np.uint64)
        a, b = self._a[:, None], self._b[:, None]
        for lo in range(0, hv.shape[0], _BLOCK_ROWS):
            h, d = hv[None, lo : lo + _BLOCK_ROWS], doc[lo : lo + _BLOCK_ROWS]
            # [num_perm, rows]: the reduction runs along contiguous memory (3x faster than [rows, num_perm]:
            # 1.5 ms instead of 10 ms for 32768 shingles).
            if self.scheme == "affine32":
                phv = a * h + b  # uint32, wraps mod 2^32 as datasketch's does
            else:
                phv = ((a * h + b) % _MERSENNE_PRIME) & _MAX_HASH32  # uint64 wraps before the mod, as datasketch
            starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
            rows = d[starts]  # distinct documents of this block, ascending
            sig[rows] = np.minimum(sig[rows], np.minimum.reduceat(phv, starts, axis=1).T)

    # -- LSH ---------------------------------------------------------------------------------------

    def band_keys(self, texts_or_signatures: Sequence[str] | np.ndarray) -> np.ndarray:
        """[n, bands] uint64: one hash per band of ``rows`` consecutive signature values (band j covers
        values j*rows .. (j+1)*rows - 1, as datasketch's hash ranges). Two documents get equal keys in
        band j exactly when their band slices are equal, up to 64-bit hash collisions (a false match
        about 2^-64 per pair and band)."""
        if isinstance(texts_or_signatures, np.ndarray) and texts_or_signatures.dtype.kind in "iu":
            sig = texts_or_signatures
            if sig.ndim != 2 or sig.shape[1] != self.num_perm or sig.dtype.kind != "u":
                raise ValueError(
                    f"signatures must be an unsigned [n, {self.num_perm}] array, got {sig.dtype} {sig.shape}"
                )
        else:
            sig = self.signatures(texts_or_signatures)
        n, b, r = sig.shape[0], self.bands, self.rows
        x = sig[:, : b * r].astype(np.uint64).reshape(n, b, r)
        # A bijective mix per (position, value), summed mod 2^64 over the band, then mixed again: band
        # slices that differ anywhere give different keys except with probability ~2^-64.
        mixed = _fmix64(x ^ self._band_salt)
        return _fmix64(mixed.sum(axis=2, dtype=np.uint64))

    def near_duplicates(
        self,
        band_keys: Sequence[np.ndarray],
        map_fn: Callable[[Callable[[Any], Any], Iterable[Any]], Any] = default_map,
        signatures: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Per shard, a [n_i] bool mask, True = drop.

        ``band_keys``: one [n_i, bands] uint64 array per shard (``band_keys`` of its texts). Documents that
        share a key in any band are duplicates; the connected components of that relation keep only their
        lowest global index (shard order, then document order). ``map_fn(fn, items)`` runs the per-band
        work, one item per band holding that band's keys of ALL shards (an executor's map: processes or
        Ray tasks); the components are then found here from the returned edges.

        With ``verify`` set, ``signatures`` (one [n_i, num_perm] array per shard) are required and a
        document joins its bucket's lowest-index document (the bucket's anchor, as NeMo Curator's
        false-positive check) only when their estimated Jaccard (the share of equal signature values) is
        at least ``threshold``: this cuts the S-curve's tail below the threshold (see the tests).
        """
        if self.verify and signatures is None:
            raise ValueError("[minhash_dedup] verify = true needs the signatures of every shard")
        if isinstance(band_keys, np.ndarray):
            raise ValueError("band_keys must be a sequence of per-shard [n_i, bands] arrays, got one array")
        for i, k in enumerate(band_keys):
            if not isinstance(k, np.ndarray) or k.ndim != 2 or k.shape[1] != self.bands or k.dtype != np.uint64:
                got = f"{k.dtype} {k.shape}" if isinstance(k, np.ndarray) else type(k).__name__
                raise ValueError(f"band_keys[{i}] must be a uint64 [n, {self.bands}] array, got {got}")
        sizes = [k.shape[0] for k in band_keys]
        total = sum(sizes)
        if total == 0:
            return [np.zeros(0, dtype=bool) for _ in sizes]
        allkeys = np.concatenate(band_keys, axis=0)
        columns = [np.ascontiguousarray(allkeys[:, j]) for j in range(self.bands)]
        edges = [np.asarray(e, dtype=np.int64).reshape(2, -1) for e in map_fn(_band_edges, columns)]
        if len(edges) != self.bands:
            raise ValueError(f"map_fn returned {len(edges)} results for {self.bands} bands")
        edges = np.unique(np.concatenate(edges, axis=1), axis=1)  # a pair sharing several bands counts once
        if self.verify:
            sig = np.concatenate(signatures, axis=0) if len(signatures) else np.zeros((0, self.num_perm))
            if sig.shape != (total, self.num_perm):
                raise ValueError(f"signatures must stack to [{total}, {self.num_perm}], got {sig.shape}")
            if edges.size:
                estimate = (sig[edges[0]] == sig[edges[1]]).mean(axis=1)
                edges = edges[:, estimate >= self.threshold]
        root = connected_components(total, edges)
        return _split(root != np.arange(total), sizes)


def _band_edges(keys: np.ndarray) -> np.ndarray:
    """[2, E] int64 edges (member, lowest index of its bucket) for one band's keys [N] of all documents;
    each bucket of equal keys becomes a star around its lowest index."""
    order = np.argsort(keys, kind="stable")  # stable: within a bucket, ascending document index
    sorted_keys = keys[order]
    new_bucket = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    head = order[np.flatnonzero(new_bucket)][np.cumsum(new_bucket) - 1]  # bucket head of each sorted member
    member = ~new_bucket
    return np.stack([order[member], head[member]]).astype(np.int64)


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """[n] int64: the lowest node index of each node's component, for undirected ``edges`` [2, E].

    Vectorised hook-and-compress: each round hooks the larger root of every edge onto the smaller, then
    jumps pointers until every node points at a root. A root only ever points lower, so each component
    ends at its minimum.
    """
    parent = np.arange(n, dtype=np.int64)
    if edges.size == 0:
        return parent
    if edges.ndim != 2 or edges.shape[0] != 2 or edges.min() < 0 or edges.max() >= n:
        raise ValueError(f"edges must be a [2, E] array of node indices in [0, {n}), got shape {edges.shape}")
    src, dst = edges[0], edges[1]
    while True:
        a, b = parent[src], parent[dst]
        differ = a != b
        if not differ.any():
            return parent
        lo, hi = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _concat_1d(arrays: Sequence[np.ndarray], what: str) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        raise ValueError(f"{what} must be a sequence of per-shard 1-D arrays, got one array")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            got = f"shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{what}[{i}] must be a 1-D array, got {got}")
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint64)


def _split(mask: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(mask, np.cumsum(sizes)[:-1]) if sizes else []
