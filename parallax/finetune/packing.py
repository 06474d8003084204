"""Batches of SFT examples: packed (padding-free, best-fit-decreasing bins) or padded.

A packed batch lays its examples back to back in one row: ``input_ids`` and ``targets`` (1, N),
``positions`` (1, N) restarting at 0 at each example, and ``cu_seqlens`` / ``max_seqlen``
describing the same boundaries. ``model(batch.input_ids, batch.targets, positions=batch.positions)``
gives the mean loss over the trained targets, each example attending only within itself. Each
example contributes its own (input, next-token target) pairs (``SFTExample.inputs_and_targets``),
so no position's target is the next example's first token: nothing is predicted across a boundary.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, SFTExample


@dataclass(frozen=True)
class PackedBatch:
    """Examples packed into one row, no padding. Shapes: N total positions, S examples."""

    input_ids: torch.Tensor  # (1, N) int64
    targets: torch.Tensor  # (1, N) int64, IGNORE_INDEX where out of the loss
    positions: torch.Tensor  # (1, N) int64, 0 .. len - 1 within each example
    cu_seqlens: torch.Tensor  # (S + 1,) int32 example offsets, ending with N
    max_seqlen: int

    @property
    def num_trained(self) -> int:
        """Targets in the loss (the loss is their mean)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with its tensors on ``device``."""
        return PackedBatch(self.input_ids.to(device), self.targets.to(device), self.positions.to(device),
                           self.cu_seqlens.to(device), self.max_seqlen)


@dataclass(frozen=True)
class PaddedBatch:
    """Examples one per row, right-padded to the longest: (B, T) each; padding is out of the loss."""

    input_ids: torch.Tensor  # (B, T) int64, pad_id after each example
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where out of the loss or padding
    num_padding: int

    @property
    def padding_share(self) -> float:
        """Share of the batch's positions that are padding."""
        return self.num_padding / self.input_ids.numel()


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most ``capacity``: items in decreasing
    length, each into the fullest bin it fits in (a new bin when none), O(n log n) with ties broken
    by index so the result is deterministic. Items are never split; each must fit on its own."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1; got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"item {too_long[0]} has length {lengths[too_long[0]]} > capacity {capacity}; "
                         "truncate examples to max_length before packing")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        where = bisect.bisect_left(free, (lengths[i], -1))
        if where == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
            continue
        space, b = free.pop(where)
        bins[b].append(i)
        bisect.insort(free, (space - lengths[i], b))
    return bins


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[list[SFTExample]]:
    """The examples grouped into best-fit-decreasing bins of at most max_length positions each."""
    return [[examples[i] for i in b] for b in best_fit_decreasing([len(e) for e in examples], max_length)]


def packing_padding_share(bins: Sequence[Sequence[SFTExample]], max_length: int) -> float:
    """Share of the bins' capacity (bins x max_length) left empty: the padding a fixed-shape packed
    batch would carry. A padding-free ``collate_packed`` batch carries none."""
    used = sum(len(e) for b in bins for e in b)
    return 1.0 - used / (len(bins) * max_length) if bins else 0.0


def collate_packed(examples: Sequence[SFTExample]) -> PackedBatch:
    """One padding-free packed row of the examples (see the module docstring)."""
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    pairs = [e.inputs_and_targets() for e in examples]
    lengths = [len(inputs) for inputs, _ in pairs]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return PackedBatch(input_ids=torch.cat([inputs for inputs, _ in pairs])[None],
                       targets=torch.cat([targets for _, targets in pairs])[None],
                       positions=torch.cat([torch.arange(n) for n in lengths])[None],
                       cu_seqlens=offsets.to(torch.int32), max_seqlen=max(lengths))


def collate_padded(examples: Sequence[SFTExample], pad_id: int) -> PaddedBatch:
    """The examples one per row, right-padded with ``pad_id`` (targets -100 there)."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    pairs = [e.inputs_and_targets() for e in examples]
    T = max(len(inputs) for inputs, _ in pairs)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, row_targets) in enumerate(pairs):
        input_ids[row, :len(inputs)] = inputs
        targets[row, :len(inputs)] = row_targets
    return PaddedBatch(input_ids, targets, num_padding=input_ids.numel() - sum(len(i) for i, _ in pairs))
