"""Exact and MinHash deduplication: signatures, (b, r) and LSH candidates against datasketch; recall and
precision on planted near-duplicates of known Jaccard similarity; components across shards."""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor

import datasketch
import numpy as np
import pytest
from datasketch.lsh import _optimal_param

from parallax.data.prep import dedup
from parallax.data.prep.dedup import (
    ExactDedup,
    MinHashDedup,
    connected_components,
    exact_duplicates,
    optimal_bands,
    shingles,
)

VOCAB_RNG = np.random.default_rng(1234)
# 20,000 random lower-case pseudo-words: distinct word 5-grams essentially never repeat by chance.
VOCAB = np.array(["".join(VOCAB_RNG.choice(list("abcdefghijklmnopqrstuvwxyz"), size=k)) for k in VOCAB_RNG.integers(3, 9, 20000)])


def _ref_shingles(text: str, n: int) -> set[bytes]:
    """The shingle definition written out plainly (the reference for ``shingles``)."""
    words = text.lower().split()
    if not words:
        return set()
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def _jaccard(a: set[bytes], b: set[bytes]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _datasketch_minhash(text: str, num_perm: int, seed: int, scheme: str, n: int = 5):
    m = datasketch.MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    for s in _ref_shingles(text, n):
        m.update(s)
    return m


def _pairs_from_band_keys(keys: np.ndarray) -> set[tuple[int, int]]:
    """All pairs (i < j) sharing a key in some band, by brute force over buckets."""
    pairs = set()
    for band in keys.T:
        buckets: dict[int, list[int]] = {}
        for i, k in enumerate(band.tolist()):
            buckets.setdefault(k, []).append(i)
        for members in buckets.values():
            pairs.update((a, b) for x, a in enumerate(members) for b in members[x + 1 :])
    return pairs


def _lowest_of_components(n: int, pairs) -> np.ndarray:
    """Plain union-find reference: the lowest index of each node's component."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def _random_docs(rng, n):
    extra = ["Ünïcödé", "ÉCOLE", "straße", "İstanbul", "日本語", "naïve", "\u3000", "\xa0", "\t", "\n", "x"]
    pool = np.concatenate([VOCAB[:300], extra])
    docs = ["", "   ", "one", "Two words", "a b c d", "a b c d e", "A  B\tc\nD e f"]
    docs += [" ".join(rng.choice(pool, size=rng.integers(0, 60))) for _ in range(n)]
    return docs


def _near_dup_corpus(rng, n_pairs, n_random, lo=0.5, hi=1.0):
    """Base documents with one edited copy each (word replacements: exact shingle Jaccard spread over
    roughly [lo, hi]) plus unrelated documents. Returns the texts and the planted pairs."""
    docs, pairs = [], []
    for _ in range(n_pairs):
        words = list(rng.choice(VOCAB, size=rng.integers(80, 200)))
        target = rng.uniform(lo, hi)
        # Replacing a word at random positions breaks up to 5 shingles; a fraction f of words replaced
        # keeps about (1 - f)^5 of the shingles, so J ~ k / (2 - k) with k = (1 - f)^5.
        keep = 2 * target / (1 + target)
        frac = 1 - keep ** (1 / 5)
        edited = list(words)
        for pos in rng.choice(len(words), size=round(frac * len(words)), replace=False):
            edited[pos] = str(rng.choice(VOCAB))
        pairs.append((len(docs), len(docs) + 1))
        docs += [" ".join(words), " ".join(edited)]
    docs += [" ".join(rng.choice(VOCAB, size=rng.integers(20, 200))) for _ in range(n_random)]
    order = rng.permutation(len(docs))  # interleave, so cluster members are not adjacent
    where = np.argsort(order)
    return [docs[i] for i in order], [tuple(sorted((int(where[a]), int(where[b])))) for a, b in pairs]


# ------------------------------------------------------------------------------------- shingles


def test_shingles_hand_cases():
    assert shingles("A b  c\td e f", 5) == [b"a b c d e", b"b c d e f"]
    assert shingles("Hello World", 5) == [b"hello world"]
    assert shingles("one two three four five", 5) == [b"one two three four five"]
    assert shingles(" \n ", 5) == []
    assert shingles("Straße\u3000ÉCOLE", 2) == ["straße école".encode()]


# -------------------------------------------------------------------------- (1) signatures


@pytest.mark.parametrize("scheme,num_perm,seed", [("affine32", 128, 1), ("affine32", 64, 7), ("legacy", 128, 1)])
def test_signatures_equal_datasketch(scheme, num_perm, seed, monkeypatch):
    # Tiny blocks and flushes: documents straddle the row blocks and the flushes.
    monkeypatch.setattr(dedup, "_BLOCK_ROWS", 7)
    monkeypatch.setattr(dedup, "_FLUSH_SHINGLES", 13)
    docs = _random_docs(np.random.default_rng(seed), 60)
    sig = MinHashDedup(num_perm=num_perm, seed=seed, scheme=scheme).signatures(docs)
    assert sig.shape == (len(docs), num_perm) and sig.dtype == np.uint64
    ref = np.stack([_datasketch_minhash(t, num_perm, seed, scheme).hashvalues for t in docs])
    np.testing.assert_array_equal(sig, ref)
    assert len(set(map(tuple, sig.tolist()))) > 50  # not a constant answer


def test_signatures_long_document_equal_datasketch():
    text = " ".join(np.random.default_rng(3).choice(VOCAB, size=40000))  # > one row block and one flush
    sig = MinHashDedup().signatures([text, "short doc"])
    np.testing.assert_array_equal(sig[0], _datasketch_minhash(text, 128, 1, "affine32").hashvalues)


def test_shingles_equal_reference():
    for text in _random_docs(np.random.default_rng(5), 40):
        assert set(shingles(text, 5)) == _ref_shingles(text, 5)
        assert set(shingles(text, 3)) == _ref_shingles(text, 3)


# ---------------------------------------------------------------------------- (2) optimal (b, r)


@pytest.mark.parametrize("num_perm", [16, 64, 128, 250])
def test_optimal_bands_equal_datasketch(num_perm):
    for threshold in (0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        assert optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5), threshold
    assert optimal_bands(0.8, 128, (0.3, 0.7)) == _optimal_param(0.8, 128, 0.3, 0.7)


def test_default_bands_and_validation():
    d = MinHashDedup()
    assert (d.bands, d.rows) == (9, 13) == (datasketch.MinHashLSH(0.8, 128).b, datasketch.MinHashLSH(0.8, 128).r)
    assert (MinHashDedup(bands=16, rows=8).bands, MinHashDedup(bands=16, rows=8).rows) == (16, 8)
    with pytest.raises(ValueError, match="bands and rows"):
        MinHashDedup(bands=4)
    with pytest.raises(ValueError, match="bands \\* rows"):
        MinHashDedup(bands=20, rows=8)
    with pytest.raises(ValueError, match="threshold"):
        MinHashDedup(threshold=1.5)
    with pytest.raises(ValueError, match="scheme"):
        MinHashDedup(scheme="affine16")
    with pytest.raises(ValueError, match="ngram"):
        MinHashDedup(ngram=0)
    with pytest.raises(ValueError, match="texts\\[1\\]"):
        d.signatures(["ok", 3])
    with pytest.raises(ValueError, match="band_keys\\[0\\]"):
        d.near_duplicates([np.zeros((3, 4), dtype=np.uint64)])
    with pytest.raises(ValueError, match="signatures"):
        d.band_keys(np.zeros((2, 64), dtype=np.uint64))
    # A string array is texts, not signatures.
    np.testing.assert_array_equal(d.band_keys(np.array(["a b c", "d e"])), d.band_keys(["a b c", "d e"]))
    with pytest.raises(ValueError, match="verify"):
        MinHashDedup(verify=True).near_duplicates([np.zeros((1, 9), dtype=np.uint64)])


# --------------------------------------------------------------------- (3) LSH candidates vs datasketch


@pytest.mark.parametrize("threshold,params", [(0.8, None), (0.5, None), (0.8, (16, 8))])
def test_lsh_candidates_equal_datasketch(threshold, params):
    docs, _ = _near_dup_corpus(np.random.default_rng(11), 80, 40, lo=0.5)
    kw = {} if params is None else {"bands": params[0], "rows": params[1]}
    d = MinHashDedup(threshold=threshold, **kw)
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=128, params=params)
    assert (lsh.b, lsh.r) == (d.bands, d.rows)
    minhashes = [_datasketch_minhash(t, 128, 1, "affine32") for t in docs]
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    expected = {(min(i, j), max(i, j)) for i, m in enumerate(minhashes) for j in lsh.query(m) if j != i}
    keys = d.band_keys(docs)
    assert keys.shape == (len(docs), d.bands) and keys.dtype == np.uint64
    assert _pairs_from_band_keys(keys) == expected
    assert len(expected) > 20  # the corpus has candidates to compare
    # Through the public entry point, across 3 shards: drop = not the lowest index of its component.
    cuts = [0, 37, 90, len(docs)]
    drops = d.near_duplicates([keys[a:b] for a, b in itertools.pairwise(cuts)])
    lowest = _lowest_of_components(len(docs), expected)
    np.testing.assert_array_equal(np.concatenate(drops), lowest != np.arange(len(docs)))


# ---------------------------------------------------------- (4) planted near-duplicates: recall, precision


def test_planted_near_duplicates_recall_precision():
    rng = np.random.default_rng(2024)
    docs, planted = _near_dup_corpus(rng, 300, 150)
    shingle_sets = [_ref_shingles(t, 5) for t in docs]
    truth = {p: _jaccard(shingle_sets[p[0]], shingle_sets[p[1]]) for p in planted}
    values = np.array(list(truth.values()))
    assert values.min() < 0.6 and values.max() > 0.97 and ((values > 0.75) & (values < 0.85)).sum() > 20

    d = MinHashDedup()  # threshold 0.8, b=9, r=13
    sig = d.signatures(docs)
    keys = d.band_keys(sig)
    reported = _pairs_from_band_keys(keys)
    exact = {p: _jaccard(shingle_sets[p[0]], shingle_sets[p[1]]) for p in reported}
    t = d.threshold

    # LSH alone follows its S-curve P(s) = 1 - (1 - s^r)^b: per Jaccard bin, the share of planted pairs
    # found is within 4 binomial standard deviations of the mean P over the bin's pairs.
    found = np.array([p in reported for p in truth])
    curve = 1 - (1 - values**d.rows) ** d.bands
    for lo in np.arange(0.5, 1.0, 0.1):
        inside = (values >= lo) & (values < lo + 0.1)
        if inside.sum() >= 10:
            expected, sd = curve[inside].mean(), np.sqrt((curve[inside] * (1 - curve[inside])).sum()) / inside.sum()
            assert abs(found[inside].mean() - expected) <= 4 * sd + 0.02, (lo, found[inside].mean(), expected)

    # Recall: pairs at J >= t + 0.1; the S-curve reaches 0.93 at 0.9 and 0.98 at 0.925 (its transition
    # is ~0.2 wide for 128 permutations: P(0.8) = 0.40), so pairs between t and t + 0.1 are found with
    # probability 0.4..0.93, by design of datasketch's (b, r).
    high = values >= t + 0.1
    assert found[high].mean() >= 0.95
    # Unrelated documents never collide.
    assert all(p in truth or exact[p] > 0.3 for p in reported)
    # LSH alone (datasketch's answer) is 0.99 precise only with a 0.15 tolerance: P(0.65) = 0.03.
    assert np.mean([exact[p] >= t - 0.15 for p in reported]) >= 0.99

    # Precision with anchor verification: a reported pair is true when its exact Jaccard is at least
    # t - 0.05; 0.05 is 1.4 standard deviations of the 128-permutation estimate at s = 0.8
    # (sqrt(0.8 * 0.2 / 128) = 0.035): pairs just below t pass the estimate that often by chance.
    verified = MinHashDedup(verify=True)
    drops = np.concatenate(verified.near_duplicates([keys[:400], keys[400:]], signatures=[sig[:400], sig[400:]]))
    dropped_pairs = [p for p in planted if drops[p[1]]]
    assert not drops[[p[0] for p in planted]].any()  # the lower index of each pair is kept
    assert drops.sum() == len(dropped_pairs)  # only planted copies are dropped
    precision = np.mean([truth[p] >= t - 0.05 for p in dropped_pairs])
    recall = np.mean([drops[p[1]] for p in planted if truth[p] >= t + 0.1])
    assert precision >= 0.99 and recall >= 0.95, (precision, recall)
    # Without verification the tail below the threshold is reported (P(0.7) = 0.08): verification
    # must not report more pairs below t - 0.05 than LSH alone.
    low_lsh = sum(1 for p in reported if exact[p] < t - 0.05)
    low_verified = sum(1 for p in dropped_pairs if truth[p] < t - 0.05)
    assert low_verified <= low_lsh


# ------------------------------------------------------------------ (5) components across shards


def test_components_across_shards_keep_lowest_global_index():
    d = MinHashDedup()
    rng = np.random.default_rng(7)
    base = [" ".join(rng.choice(VOCAB, size=120)) for _ in range(4)]
    # Cluster A: copies chained by one-word edits (a chain: every link similar); cluster B: exact copies.
    chain = [base[0]]
    for _ in range(3):
        words = chain[-1].split()
        words[int(rng.integers(len(words)))] = "zzzz"
        chain.append(" ".join(words))
    shards = [
        [base[2], chain[1], base[1]],  # global 0, 1, 2
        [chain[3], base[3], base[1]],  # 3, 4, 5
        [chain[0], chain[2], base[3] + " "],  # 6, 7, 8
    ]
    drops = d.near_duplicates([d.band_keys(s) for s in shards])
    assert [m.tolist() for m in drops] == [[False, False, False], [True, False, True], [True, True, True]]
    assert d.near_duplicates([d.band_keys(s) for s in ([], ["a b c d e f"])])[0].shape == (0,)


def test_connected_components_reference():
    rng = np.random.default_rng(0)
    n = 500
    edges = rng.integers(0, n, size=(2, 420))
    np.testing.assert_array_equal(connected_components(n, edges), _lowest_of_components(n, edges.T.tolist()))
    # A long path given in reverse order (worst case for pointer jumping rounds).
    path = np.stack([np.arange(n - 1, 0, -1), np.arange(n - 2, -1, -1)])
    assert (connected_components(n, path) == 0).all()


# ------------------------------------------------------------------------ (6) exact dedup


def test_exact_dedup_keeps_first_occurrence_across_shards():
    e = ExactDedup()
    shards = [["a", "b", "a"], ["c", "b"], [], ["a", "A", "c", "d"]]
    keys = [e.keys(s) for s in shards]
    assert keys[0].dtype == np.uint64 and keys[2].shape == (0,)
    assert keys[0][0] == keys[0][2] and keys[0][0] != keys[0][1]
    drops = exact_duplicates(keys)
    assert [m.tolist() for m in drops] == [[False, False, True], [False, True], [], [True, False, True, False]]
    with pytest.raises(ValueError, match="texts\\[1\\]"):
        e.keys(["a", b"b"])
    with pytest.raises(ValueError, match="keys\\[1\\]"):
        exact_duplicates([keys[0], np.zeros((2, 2), dtype=np.uint64)])


# -------------------------------------------------------------- (7) process-pool map_fn equals builtin map


def test_near_duplicates_process_pool_equals_builtin_map():
    docs, _ = _near_dup_corpus(np.random.default_rng(3), 80, 40)
    d = MinHashDedup()
    keys = [d.band_keys(docs[i : i + 50]) for i in range(0, len(docs), 50)]
    builtin = d.near_duplicates(keys)
    with ProcessPoolExecutor(2) as pool:
        pooled = d.near_duplicates(keys, map_fn=lambda fn, items: list(pool.map(fn, items)))
    assert sum(int(m.sum()) for m in builtin) > 10
    for a, b in zip(builtin, pooled):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- the faster "words" shingle hash


def _py_fmix64(h: int) -> int:
    m = (1 << 64) - 1
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & m
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & m
    return h ^ (h >> 33)


def _py_words_hash(shingle: tuple[str, ...]) -> int:
    """The "words" shingle hash written out in plain Python (its definition)."""
    import hashlib

    h = 0
    for w in shingle:
        h = _py_fmix64(h ^ int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little"))
    return h >> 32


@pytest.mark.parametrize("ngram", [5, 3])
def test_words_hash_signatures_equal_datasketch_with_its_hashfunc(ngram, monkeypatch):
    monkeypatch.setattr(dedup, "_FLUSH_SHINGLES", 50)  # several flushes
    docs = _random_docs(np.random.default_rng(9), 40)
    sig = MinHashDedup(shingle_hash="words", ngram=ngram).signatures(docs)
    for i, text in enumerate(docs):
        words = text.lower().split()
        grams = {tuple(words[k : k + ngram]) for k in range(max(len(words) - ngram + 1, 1))} if words else set()
        m = datasketch.MinHash(128, 1, hashfunc=_py_words_hash)
        for g in grams:
            m.update(g)
        np.testing.assert_array_equal(sig[i], m.hashvalues, err_msg=repr(text))


def test_words_hash_estimates_jaccard():
    docs, planted = _near_dup_corpus(np.random.default_rng(21), 60, 0)
    sig = MinHashDedup(shingle_hash="words").signatures(docs)
    sets = [_ref_shingles(t, 5) for t in docs]
    err = [(sig[a] == sig[b]).mean() - _jaccard(sets[a], sets[b]) for a, b in planted]
    # 128 permutations: the estimate's standard deviation is at most 0.044; its mean error over 60
    # pairs at most ~0.006 unless biased.
    assert abs(np.mean(err)) < 0.02 and np.std(err) < 0.06
    with pytest.raises(ValueError, match="shingle_hash"):
        MinHashDedup(shingle_hash="md5")


def test_registry_and_pickle():
    import pickle

    from parallax.data.prep.stages import build_stage

    stage = build_stage("minhash_dedup", {"threshold": 0.7, "num_perm": 64})
    assert (stage.bands, stage.rows) == _optimal_param(0.7, 64, 0.5, 0.5)
    assert build_stage("exact_dedup", {"enabled": False}) is None
    assert isinstance(build_stage("exact_dedup", {}), ExactDedup)
    docs = ["the quick brown fox jumps over the lazy dog", "ab cd"]
    clone = pickle.loads(pickle.dumps(stage))  # what a worker process receives
    np.testing.assert_array_equal(clone.band_keys(docs), stage.band_keys(docs))
