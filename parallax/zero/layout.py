"""Where each parameter lives in a flat buffer, and which part of the buffer each rank owns.

Pure bookkeeping (no tensors, no communication), so it can be tested alone and reused by the
checkpoint manifest: a buffer of ``total`` elements is padded to a multiple of the world size
and rank ``r`` owns the contiguous elements ``[r * shard, (r + 1) * shard)``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Slot", "Segment", "FlatLayout"]


@dataclass(frozen=True)
class Slot:
    """One parameter inside a flat buffer: elements ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    requires_grad: bool


@dataclass(frozen=True)
class Segment:
    """The part of one parameter inside one rank's shard.

    Elements ``[start, end)`` of the flattened parameter ``name`` sit at ``[shard_offset,
    shard_offset + end - start)`` of the rank's shard.
    """

    name: str
    start: int
    end: int
    shard_offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start


class FlatLayout:
    """Parameters packed back to back, padded to a multiple of ``world_size``."""

    def __init__(self, params: list[tuple[str, tuple[int, ...], bool]], world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        slots, offset = [], 0
        for name, shape, requires_grad in params:
            numel = 1
            for d in shape:
                numel *= d
            slots.append(Slot(name, tuple(shape), offset, numel, requires_grad))
            offset += numel
        self.slots: list[Slot] = slots
        self.numel = offset
        self.shard_numel = -(-offset // world_size)
        self.padded_numel = self.shard_numel * world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """Elements ``[lo, hi)`` of the padded buffer that ``rank`` owns."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def segments(self, rank: int) -> list[Segment]:
        """The pieces of parameters inside ``rank``'s shard, in buffer order (padding excluded)."""
        lo, hi = self.shard_range(rank)
        out = []
        for slot in self.slots:
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if a < b:
                out.append(Segment(slot.name, a - slot.offset, b - slot.offset, a - lo))
        return out
