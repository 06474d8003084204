"""``PreferenceDataset``: preference pairs as the ``parallax train`` loop consumes data.

As ``SFTDataset``: the batch of (step, rank) is a pure function of (seed, step, rank), so a
resumed run sees the batches of an uninterrupted one. A unit is a pair; a step takes
``batch_size`` pairs per rank (2 x batch_size sequences, packed or padded, see ``collate_pairs``).
Precomputed reference log-probabilities (full fine-tuning), once set, ride along in each batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from parallax.align.batch import PreferenceBatch, collate_pairs
from parallax.align.data import PreferenceSplits
from parallax.finetune.dataset import _epoch_order

__all__ = ["PreferenceDataset"]


class PreferenceDataset:
    def __init__(self, splits: PreferenceSplits, tokenizer, *, packing: bool, pad_id: int, block_size: int) -> None:
        if not splits.train:
            raise ValueError("the preference data has no training pairs")
        self.tokenizer = tokenizer
        self.splits = splits
        self.packing = packing
        self.pad_id = pad_id
        self.block_size = block_size
        self.reference: dict[str, torch.Tensor] | None = None  # split -> (N, 2) chosen, rejected
        self.content_hash = _content_hash(splits)

    def pairs(self, split: str) -> list:
        return self.splits.train if split == "train" else self.splits.val

    def check_block_size(self, block_size: int) -> None:
        longest = max(len(p) for p in self.splits.train + self.splits.val)
        if longest > block_size:
            raise ValueError(f"a preference sequence has {longest} positions, more than the model's block_size "
                             f"{block_size}")

    def get_batch(self, split: str, batch_size: int, block_size: int, *, step: int, seed: int, rank: int = 0,
                  world_size: int = 1, device: torch.device | str = "cpu") -> PreferenceBatch:
        """``batch_size`` pairs from per-epoch permutations seeded by (seed, epoch), each rank a
        disjoint slice of the global batch."""
        first = (step * world_size + rank) * batch_size
        return self.batch_of(split, _epoch_order(len(self.pairs(split)), seed, first, batch_size), device)

    def window_targets(self, step: int, accum: int, batch_size: int, block_size: int, world_size: int,
                       seed: int) -> int:
        """Pairs in optimizer step ``step`` over all micro-batches and ranks: the loss is their mean."""
        return accum * world_size * batch_size

    def iter_eval_batches(self, split: str, batch_size: int, block_size: int, max_batches: int | None = None, *,
                          device: torch.device | str = "cpu") -> Iterator[PreferenceBatch]:
        """The first ``max_batches`` batches of ``split`` in order (the training pairs' first batch
        when there is no held-out pair)."""
        if not self.splits.val and split == "val":
            split, count = "train", min(batch_size, len(self.splits.train))
        else:
            count = len(self.pairs(split))
        starts = range(0, count, batch_size)
        for start in starts if max_batches is None else starts[:max_batches]:
            yield self.batch_of(split, list(range(start, min(start + batch_size, count))), device)

    def batch_of(self, split: str, indices: list[int], device: torch.device | str) -> PreferenceBatch:
        """The pairs ``indices`` of ``split`` as one batch (with their reference log-probabilities once set)."""
        pairs = self.pairs(split)
        batch = collate_pairs([pairs[i] for i in indices], self.pad_id, indices=indices, packing=self.packing,
                              block_size=self.block_size, device=device)
        if self.reference is not None:
            table = self.reference[split][indices]  # (B, 2)
            batch = batch.with_reference(torch.cat([table[:, 0], table[:, 1]]))
        return batch


def _content_hash(splits: PreferenceSplits) -> str:
    digest = hashlib.sha256()
    for name, pairs in (("train", splits.train), ("val", splits.val)):
        digest.update(name.encode())
        for p in pairs:
            digest.update(repr((p.chosen.tokens, p.chosen.trained, p.rejected.tokens, p.rejected.trained)).encode())
    return digest.hexdigest()[:16]
