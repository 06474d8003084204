"""``SFTDataset``: SFT examples as the ``parallax train`` loop consumes data.

The loop asks for the batch of (step, rank) and gets a tuple of model arguments; everything is a
pure function of (seed, step, rank), so a resumed run sees the batches an uninterrupted run sees
(no sampler state in checkpoints). Units are examples (unpacked: a step takes ``batch_size``
examples per rank, right-padded) or best-fit-decreasing bins (packed: ``batch_size`` bins per
rank, one row each, the examples of a row back to back with positions restarting at 0).

On CUDA a packed step is one padding-free row of every example of its bins (varlen
FlashAttention over cu_seqlens). On CPU each bin is a row, padded only to the longest bin of the
step (the bins' slack, about 1% with best-fit-decreasing): one row per bin keeps the CPU's
block-diagonal mask per row, where one row would make it (and its attention) N x N for N = batch x
length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from parallax.finetune.data import IGNORE_INDEX, SFTExample, SFTSplits
from parallax.finetune.packing import pack_examples

__all__ = ["SFTDataset"]

Batch = tuple[torch.Tensor, ...]


class SFTDataset:
    """Training and validation batches of SFT examples for ``parallax.train.loop``.

    ``get_batch`` returns ``(input_ids, targets)`` (B, T) unpacked or ``(input_ids, targets,
    positions)`` packed: the arguments of ``model(...)``.
    """

    def __init__(self, splits: SFTSplits, tokenizer, *, block_size: int, packing: bool, pad_id: int) -> None:
        if not splits.train:
            raise ValueError("the training data has no examples with a token in the loss")
        self.tokenizer = tokenizer
        self.packing = packing
        self.pad_id = pad_id
        self.splits = splits
        self.units = {"train": self._units(splits.train, block_size), "val": self._units(splits.val, block_size)}
        self.content_hash = _content_hash(splits)

    def _units(self, examples: Sequence[SFTExample], block_size: int) -> list[list[SFTExample]]:
        return pack_examples(examples, block_size) if self.packing else [[e] for e in examples]

    def check_block_size(self, block_size: int) -> None:
        longest = max((len(e) for e in self.splits.train + self.splits.val), default=0)
        if longest > block_size:
            raise ValueError(f"an example has {longest} positions, more than the model's block_size {block_size}")

    def padding_share(self, batch_size: int, seed: int = 0) -> float:
        """Padded positions / all positions over one epoch of training batches of ``batch_size``
        units (what the run feeds the model; packed runs pad only the bins' slack)."""
        units = self.units["train"]
        sizes = [sum(len(e) for e in units[i]) for i in _epoch_order(len(units), seed, 0, len(units))]
        batches = [sizes[b:b + batch_size] for b in range(0, len(sizes), batch_size)]
        total = sum(max(b) * len(b) for b in batches)
        return 1.0 - sum(sizes) / total

    def get_batch(self, split: str, batch_size: int, block_size: int, *, step: int, seed: int, rank: int = 0,
                  world_size: int = 1, device: torch.device | str = "cpu") -> Batch:
        """The batch of ``step`` for ``rank``: ``batch_size`` units drawn from per-epoch
        permutations seeded by (seed, epoch), each rank a disjoint slice of the global batch."""
        units = self.units[split]
        first = (step * world_size + rank) * batch_size
        return self._collate([units[i] for i in _epoch_order(len(units), seed, first, batch_size)], device)

    def window_targets(self, step: int, accum: int, batch_size: int, block_size: int, world_size: int,
                       seed: int) -> int:
        """Trained targets over optimizer step ``step``'s batches (``accum`` micro-batches on each
        of ``world_size`` ranks): the loss is their mean, however the window is split."""
        units = self.units["train"]
        first = step * accum * world_size * batch_size
        window = _epoch_order(len(units), seed, first, accum * world_size * batch_size)
        return sum(e.num_trained for i in window for e in units[i])

    def iter_eval_batches(self, split: str, batch_size: int, block_size: int, max_batches: int | None = None, *,
                          device: torch.device | str = "cpu") -> Iterator[Batch]:
        """The first ``max_batches`` batches of ``split`` in order (the same every evaluation)."""
        units = self.units[split] or self.units["train"][:batch_size]  # no held-out data: the first train batch
        count = len(range(0, len(units), batch_size))
        for b in range(count if max_batches is None else min(count, max_batches)):
            yield self._collate(units[b * batch_size:(b + 1) * batch_size], device)

    def _collate(self, units: list[list[SFTExample]], device: torch.device | str) -> Batch:
        if self.packing and torch.device(device).type == "cuda":
            units = [[e for unit in units for e in unit]]  # one padding-free row: varlen attention has no T x T cost
        pairs = [[e.inputs_and_targets() for e in unit] for unit in units]
        T = max(sum(len(x) for x, _ in row) for row in pairs)
        input_ids = torch.full((len(units), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(units), T), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(units), T), dtype=torch.long)
        for r, row in enumerate(pairs):
            t = 0
            for x, y in row:
                input_ids[r, t:t + len(x)], targets[r, t:t + len(x)] = x, y
                positions[r, t:t + len(x)] = torch.arange(len(x))
                t += len(x)
            positions[r, t:] = torch.arange(T - t)  # the padding: one more segment, out of the loss
        batch = (input_ids, targets, positions) if self.packing else (input_ids, targets)
        return tuple(t.to(device) for t in batch)


def _epoch_order(n: int, seed: int, first: int, count: int) -> list[int]:
    """Items first .. first + count - 1 of the endless sequence of per-epoch permutations of range(n)."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(first + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.extend(perm[offset:offset + count - len(out)])
    return out


def _content_hash(splits: SFTSplits) -> str:
    digest = hashlib.sha256()
    for name, examples in (("train", splits.train), ("val", splits.val)):
        digest.update(name.encode())
        for e in examples:
            digest.update(repr((e.tokens, e.trained)).encode())
    return digest.hexdigest()[:16]
