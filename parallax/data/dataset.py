"""A tokenized corpus split into train/val, and the batches a training loop draws from it.

Batches are a pure function of ``(seed, split, step, rank, world_size)``: the offsets come
from a generator seeded with those numbers, so resuming at step ``k`` reproduces the data
exactly with no sampler state to checkpoint, and each rank reads different windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from parallax.data.errors import DataError
from parallax.data.tokenizer import ByteTokenizer, Tokenizer
from parallax.validate import non_negative_int, positive_int

__all__ = ["TokenDataset", "Split", "SPLITS"]

Split = Literal["train", "val"]
SPLITS: tuple[str, ...] = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}  # mixed into the seed so train and val draws are independent


class TokenDataset:
    """A 1-D token array with the last ``val_fraction`` of it held out for validation.

    ``tokens`` is usually the read-only uint16 (or uint32) memmap from the cache (see ``load_dataset``);
    any 1-D integer array with ids below ``tokenizer.vocab_size`` works. Splitting on a token
    boundary (not a document boundary) keeps the split sizes exact and cheap to compute.
    ``val_tokens``, when given, is the exact size of the validation split instead (data with
    documents inserted into its training split keeps the validation split it had without them).
    """

    def __init__(self, tokens: np.ndarray, *, tokenizer: Tokenizer | None = None, source: str = "<array>",
                 val_fraction: float = 0.1, content_hash: str | None = None, cache_path: str | None = None,
                 val_tokens: int | None = None):
        if tokens.ndim != 1:
            raise ValueError(f"TokenDataset: tokens must be 1-D, got shape {tokens.shape}")
        if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
            raise ValueError(f"TokenDataset: val_fraction must be a number in (0, 1), got {val_fraction!r}")
        n = len(tokens)
        n_val = max(1, round(n * val_fraction)) if val_tokens is None else val_tokens  # never empty, even for tiny data
        if n_val < 1 or n - n_val < 1:
            raise DataError(f"{source}: {n} tokens are too few to split with val_fraction={val_fraction} "
                            f"({n - n_val} train, {n_val} val)")
        self.tokens = tokens
        self.tokenizer = tokenizer or ByteTokenizer()
        self.source = source
        self.val_fraction = float(val_fraction)
        self.split_point = n - n_val  # tokens[:split_point] is train, tokens[split_point:] is val
        self.content_hash = content_hash
        self.cache_path = cache_path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split_tokens(self, split: Split) -> np.ndarray:
        """The (N_split,) token view of ``split`` ('train' or 'val'); no copy."""
        if split == "train":
            return self.tokens[: self.split_point]
        if split == "val":
            return self.tokens[self.split_point :]
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def num_tokens(self, split: Split | None = None) -> int:
        """Tokens in ``split``, or in the whole dataset when ``split`` is None."""
        return len(self.tokens) if split is None else len(self.split_tokens(split))

    def check_block_size(self, block_size: int) -> None:
        """Raise ``DataError`` unless both splits hold at least ``block_size + 1`` tokens
        (one window plus its shifted target); call it before building a model to fail early."""
        for split in SPLITS:
            self._checked_tokens(split, block_size)

    def batch_offsets(self, split: Split, batch_size: int, block_size: int, *, step: int, seed: int,
                      rank: int = 0, world_size: int = 1) -> np.ndarray:
        """(batch_size,) int64 start offsets, into ``split_tokens(split)``, of ``get_batch``'s rows.

        One generator seeded from (seed, split, step) draws ``batch_size * world_size`` offsets
        and rank ``r`` takes the r-th slice, so the global batch of a step is the same for any
        split of it over ranks (2 ranks x 4 rows == 1 rank x 8 rows).
        """
        tokens = self._checked_tokens(split, block_size)
        positive_int("batch_size", batch_size)
        non_negative_int("step", step)
        non_negative_int("seed", seed)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], step]))
        # Highest start is len - block_size - 1 so the target window (start + 1 .. start + block_size) fits.
        offsets = rng.integers(0, len(tokens) - block_size, size=batch_size * world_size, dtype=np.int64)
        return offsets[rank * batch_size : (rank + 1) * batch_size]

    def get_batch(self, split: Split, batch_size: int, block_size: int, *, step: int, seed: int,
                  rank: int = 0, world_size: int = 1,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows for training: x (B, T) and y (B, T), int64, B = batch_size, T = block_size;
        y[:, t] is the token that follows x[:, t] in the corpus (so y[:, :-1] == x[:, 1:]).

        Deterministic in (seed, split, step, rank, world_size); see ``batch_offsets``. With a CUDA
        ``device`` the copy goes through pinned memory and does not block.
        """
        offsets = self.batch_offsets(split, batch_size, block_size, step=step, seed=seed, rank=rank,
                                     world_size=world_size)
        return self._gather(self.split_tokens(split), offsets, block_size, device)

    def window_targets(self, step: int, accum: int, batch_size: int, block_size: int, world_size: int,
                       seed: int) -> int:
        """Targets in the loss over optimizer step ``step``'s batches (``accum`` micro-batches on
        each of ``world_size`` ranks): every position of every window."""
        return accum * world_size * batch_size * block_size

    def iter_eval_batches(self, split: Split, batch_size: int, block_size: int, max_batches: int | None = None, *,
                          device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed evaluation batches, x and y (B, T) int64 as in ``get_batch``; the last one may be smaller.

        The windows do not overlap and are spread evenly over the whole split (all of it when
        ``max_batches`` is None), independent of any seed or step, so a validation loss is
        comparable between steps and between runs with the same data and block_size.
        """
        tokens = self._checked_tokens(split, block_size)
        positive_int("batch_size", batch_size)
        if max_batches is not None:
            positive_int("max_batches", max_batches)
        n_windows = (len(tokens) - 1) // block_size
        total = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
        last = len(tokens) - block_size - 1
        # Evenly spaced from 0 to `last` (i * last // (total - 1), split into quotient and remainder
        # so it cannot overflow int64); the spacing is >= block_size because total <= n_windows.
        q, r = divmod(last, max(total - 1, 1))
        i = np.arange(total, dtype=np.int64)
        offsets = i * q + i * r // max(total - 1, 1)
        for start in range(0, total, batch_size):
            yield self._gather(tokens, offsets[start : start + batch_size], block_size, device)

    def num_eval_batches(self, split: Split, batch_size: int, block_size: int, max_batches: int | None = None) -> int:
        """How many batches ``iter_eval_batches`` yields with the same arguments."""
        n_windows = (len(self._checked_tokens(split, block_size)) - 1) // block_size
        total = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
        return math.ceil(total / batch_size)

    def _checked_tokens(self, split: Split, block_size: int) -> np.ndarray:
        tokens = self.split_tokens(split)
        positive_int("block_size", block_size)
        if len(tokens) < block_size + 1:
            raise DataError(f"{self.source}: the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; use a smaller block_size or more data")
        return tokens

    @staticmethod
    def _gather(tokens: np.ndarray, offsets: np.ndarray, block_size: int,
                device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = offsets[:, None] + np.arange(block_size + 1)  # (B, T + 1)
        buf = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T + 1); copies out of the memmap
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each
        if device is not None and torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        if device is not None:
            return x.to(device), y.to(device)
        return x, y

    def __repr__(self) -> str:
        return (f"TokenDataset(source={self.source!r}, train={self.num_tokens('train')}, "
                f"val={self.num_tokens('val')}, vocab_size={self.vocab_size})")


