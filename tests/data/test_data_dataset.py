"""Train/val split, the built-in corpus, and batch sampling (determinism, shapes, contents)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.data import DataError, TokenDataset, builtin_documents, load_dataset


@pytest.fixture(scope="module")
def arange_ds() -> TokenDataset:
    """10,000 "tokens" equal to their position, so every window shows where it came from.
    (Values past the vocabulary are fine here: TokenDataset only slices.)"""
    return TokenDataset(np.arange(10_000, dtype=np.int64), val_fraction=0.1)


def test_builtin_corpus():
    ds = load_dataset()
    n = ds.num_tokens()
    # pydoc_data.topics is ~0.47 MB of text on Python 3.11 (it varies a little by version).
    assert n > 300_000
    assert ds.vocab_size == 257
    tokens = np.asarray(ds.tokens)
    assert tokens.max() < 257 and tokens.min() >= 0
    docs = builtin_documents()
    assert int((tokens == 256).sum()) == len(docs) - 1  # one EOT between documents
    assert ds.num_tokens("train") + ds.num_tokens("val") == n
    assert ds.num_tokens("val") == round(0.1 * n)
    first = tokens[: np.argmax(tokens == 256)]
    assert ds.tokenizer.decode(first) == docs[0]
    ds.check_block_size(1024)  # the demo's largest context fits in val
    assert load_dataset().content_hash == ds.content_hash  # deterministic


@pytest.mark.parametrize("val_fraction", [0.01, 0.1, 0.25, 0.5])
def test_split_is_the_tail(arange_ds: TokenDataset, val_fraction: float):
    ds = TokenDataset(arange_ds.tokens, val_fraction=val_fraction)
    train, val = ds.split_tokens("train"), ds.split_tokens("val")
    assert len(train) + len(val) == 10_000
    assert len(val) == round(10_000 * val_fraction)
    assert np.array_equal(np.concatenate([train, val]), arange_ds.tokens)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "0.1", None])
def test_val_fraction_validated(bad: object, data_dir: Path):
    with pytest.raises(ValueError, match="val_fraction"):
        TokenDataset(np.zeros(100, np.uint16), val_fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset(val_fraction=bad)  # type: ignore[arg-type]


def test_unknown_split(arange_ds: TokenDataset):
    with pytest.raises(ValueError, match="'train', 'val'"):
        arange_ds.num_tokens("test")  # type: ignore[arg-type]


def test_too_small_for_block_size(data_dir: Path):
    f = data_dir / "small.txt"
    f.write_text("x" * 200)  # 180 train, 20 val tokens
    ds = load_dataset(f)
    ds.check_block_size(19)
    with pytest.raises(DataError, match=r"val split has 20 tokens.*block_size \+ 1 = 21"):
        ds.check_block_size(20)
    with pytest.raises(DataError, match=r"val split has 20 tokens.*block_size \+ 1 = 33"):
        ds.get_batch("val", 2, 32, step=0, seed=0)
    with pytest.raises(DataError, match=r"train split has 180 tokens.*block_size \+ 1 = 257"):
        ds.get_batch("train", 2, 256, step=0, seed=0)
    with pytest.raises(DataError, match="block_size"):
        next(ds.iter_eval_batches("val", 2, 64))


def test_batch_shape_dtype_and_contents(arange_ds: TokenDataset):
    B, T = 8, 33
    for split in ("train", "val"):
        x, y = arange_ds.get_batch(split, B, T, step=3, seed=7)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        tokens = torch.from_numpy(arange_ds.split_tokens(split).astype(np.int64))
        offsets = arange_ds.batch_offsets(split, B, T, step=3, seed=7)
        for i, o in enumerate(offsets.tolist()):
            assert torch.equal(x[i], tokens[o : o + T])
            assert torch.equal(y[i], tokens[o + 1 : o + T + 1])


@settings(max_examples=40, deadline=None)
@given(batch_size=st.integers(1, 16), block_size=st.integers(1, 999), step=st.integers(0, 2**40),
       seed=st.integers(0, 2**64))
def test_offsets_in_bounds_and_reproducible(arange_ds: TokenDataset, batch_size: int, block_size: int, step: int,
                                           seed: int):
    for split in ("train", "val"):
        n = arange_ds.num_tokens(split)
        if n < block_size + 1:
            continue
        off = arange_ds.batch_offsets(split, batch_size, block_size, step=step, seed=seed)
        assert off.shape == (batch_size,) and off.dtype == np.int64
        assert off.min() >= 0 and off.max() + block_size < n  # the target's last token exists
        assert np.array_equal(off, arange_ds.batch_offsets(split, batch_size, block_size, step=step, seed=seed))


def test_batches_are_a_pure_function_of_seed_step_rank(arange_ds: TokenDataset):
    def batch(**kw):
        args = {"step": 5, "seed": 1, "rank": 0, "world_size": 2} | kw
        return arange_ds.get_batch("train", 4, 64, **args)

    x0, y0 = batch()
    x1, y1 = batch()
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(batch(step=6)[0], x0)
    assert not torch.equal(batch(seed=2)[0], x0)
    assert not torch.equal(batch(rank=1)[0], x0)
    assert not torch.equal(arange_ds.get_batch("val", 4, 64, step=5, seed=1, world_size=2)[0], x0)


def test_resume_from_a_fresh_load_is_bit_exact(data_dir: Path):
    f = data_dir / "a.txt"
    f.write_text("".join(chr(97 + i % 26) * (1 + i % 5) for i in range(3000)))
    run1 = [load_dataset(f).get_batch("train", 4, 32, step=s, seed=3) for s in range(5)]
    resumed = load_dataset(f)  # a new process would see exactly this
    for s in (3, 4):
        x, y = resumed.get_batch("train", 4, 32, step=s, seed=3)
        assert torch.equal(x, run1[s][0]) and torch.equal(y, run1[s][1])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_single_process_batch(arange_ds: TokenDataset, world_size: int):
    """Rank r gets rows [r*B, (r+1)*B) of the batch one process would draw with B*world_size rows."""
    B, T = 3, 16
    whole, whole_y = arange_ds.get_batch("train", B * world_size, T, step=11, seed=0)
    parts = [arange_ds.get_batch("train", B, T, step=11, seed=0, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)


@pytest.mark.parametrize("kw, match", [({"rank": 2, "world_size": 2}, "rank"), ({"rank": -1}, "rank"),
                                       ({"step": -1}, "step"), ({"seed": -5}, "seed")])
def test_bad_batch_arguments(arange_ds: TokenDataset, kw: dict, match: str):
    args = {"step": 0, "seed": 0} | kw
    with pytest.raises(ValueError, match=match):
        arange_ds.get_batch("train", 2, 8, **args)


@pytest.mark.parametrize("batch_size, block_size", [(0, 8), (2, 0)])
def test_bad_sizes(arange_ds: TokenDataset, batch_size: int, block_size: int):
    with pytest.raises(ValueError, match="must be a positive integer"):
        arange_ds.get_batch("train", batch_size, block_size, step=0, seed=0)


def test_eval_batches_fixed_spread_and_non_overlapping(arange_ds: TokenDataset):
    B, T = 4, 50
    first = list(arange_ds.iter_eval_batches("val", B, T, max_batches=3))
    again = list(arange_ds.iter_eval_batches("val", B, T, max_batches=3))
    assert len(first) == 3 == arange_ds.num_eval_batches("val", B, T, max_batches=3)
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (B, T) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    val = arange_ds.split_tokens("val")
    starts = []
    for x, y in first:
        for row, target in zip(x, y):
            o = int(row[0]) - arange_ds.split_point  # values are positions in the full array
            assert np.array_equal(row.numpy(), val[o : o + T])
            assert np.array_equal(target.numpy(), val[o + 1 : o + T + 1])
            starts.append(o)
    assert starts == sorted(starts) and min(np.diff(starts)) >= T  # no overlap
    assert starts[-1] > len(val) // 2  # spread over the split, not bunched at its start


def test_eval_batches_cover_the_split_when_uncapped(arange_ds: TokenDataset):
    B, T = 4, 64
    n_val = arange_ds.num_tokens("val")  # 1000 tokens -> 15 windows of 64 (+1 target token)
    batches = list(arange_ds.iter_eval_batches("val", B, T))
    sizes = [x.shape[0] for x, _ in batches]
    assert sum(sizes) == (n_val - 1) // T == 15
    assert sizes == [4, 4, 4, 3]  # the last batch holds the remainder
    assert len(batches) == arange_ds.num_eval_batches("val", B, T)


def test_eval_batches_do_not_depend_on_training_draws(arange_ds: TokenDataset):
    before = [x for x, _ in arange_ds.iter_eval_batches("val", 2, 16, max_batches=2)]
    arange_ds.get_batch("train", 2, 16, step=9, seed=9)
    after = [x for x, _ in arange_ds.iter_eval_batches("val", 2, 16, max_batches=2)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
