"""``PreferenceBatch``: B preference pairs as the 2B sequences of one forward, chosen first.

Unpacked, the sequences are 2B right-padded rows. Packed, they are laid back to back in rows of
at most ``block_size`` positions (best-fit-decreasing, positions restarting at 0 at each, so each
attends only within itself); on CUDA in one padding-free row (varlen attention). ``sequence``
maps every position to its sequence (0..B-1 chosen, B..2B-1 rejected; -1 for padding), which is
all the loss needs to sum log-probabilities per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from parallax.align.data import PreferencePair
from parallax.finetune.data import IGNORE_INDEX
from parallax.finetune.packing import best_fit_decreasing

__all__ = ["PreferenceBatch", "collate_pairs"]


@dataclass(frozen=True)
class PreferenceBatch:
    """Shapes: R rows of T positions holding 2B sequences."""

    input_ids: torch.Tensor  # (R, T) int64
    targets: torch.Tensor  # (R, T) int64, IGNORE_INDEX outside the completions
    sequence: torch.Tensor  # (R, T) int64: the sequence of each position, -1 for padding
    positions: torch.Tensor | None  # (R, T) int64 restarting at 0 per sequence when packed, else None
    indices: torch.Tensor  # (B,) int64: the pairs' indices in their split (precomputed reference lookup)
    reference_logps: torch.Tensor | None = None  # (2B,) fp32 summed reference log-probabilities, if known

    @property
    def num_pairs(self) -> int:
        return self.indices.numel()

    @property
    def num_tokens(self) -> int:
        """Positions holding a sequence's token (padding excluded)."""
        return int((self.sequence >= 0).sum())

    def model_args(self) -> tuple[torch.Tensor, ...]:
        """The arguments of ``model(...)``: (input_ids, targets[, positions])."""
        if self.positions is None:
            return self.input_ids, self.targets
        return self.input_ids, self.targets, self.positions

    def with_reference(self, reference_logps: torch.Tensor) -> PreferenceBatch:
        return replace(self, reference_logps=reference_logps.to(self.input_ids.device))

    def to(self, device: torch.device | str) -> PreferenceBatch:
        move = (lambda t: None if t is None else t.to(device))
        return PreferenceBatch(self.input_ids.to(device), self.targets.to(device), self.sequence.to(device),
                               move(self.positions), self.indices.to(device), move(self.reference_logps))


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int, *, indices: Sequence[int] | None = None,
                  packing: bool = False, block_size: int | None = None,
                  device: torch.device | str = "cpu") -> PreferenceBatch:
    """The pairs as one batch (see the module docstring); ``indices`` default 0..B-1; ``packing``
    needs ``block_size`` (the longest row)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tensors = [s.inputs_and_targets() for s in sequences]
    if not packing:
        rows = [[i] for i in range(len(sequences))]
    elif torch.device(device).type == "cuda":
        rows = [list(range(len(sequences)))]
    else:
        if block_size is None:
            raise ValueError("packing needs block_size")
        rows = best_fit_decreasing([len(x) for x, _ in tensors], block_size)
    T = max(sum(len(tensors[i][0]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    sequence = torch.full((len(rows), T), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            x, y = tensors[i]
            input_ids[r, t:t + len(x)], targets[r, t:t + len(x)], sequence[r, t:t + len(x)] = x, y, i
            positions[r, t:t + len(x)] = torch.arange(len(x))
            t += len(x)
        positions[r, t:] = torch.arange(T - t)  # the padding: one more segment, out of the loss
    index = torch.tensor(list(range(len(pairs))) if indices is None else list(indices), dtype=torch.long)
    return PreferenceBatch(input_ids, targets, sequence, positions if packing else None, index).to(device)
