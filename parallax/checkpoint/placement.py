"""Where a rank's parameters sit in the full model, for checkpoints of tensor-, pipeline- and
data-parallel (3D) models.

A rank holds a parameter whole or, under tensor parallelism, as one slice of the full tensor
along one dimension (a ``Place``). A checkpoint records each saved piece with its place, so a
rank of another ``(pp, dp, tp)`` layout finds the elements of its own place in the saved
slices (``Region``), reading only the rows it needs. ``RankRole`` says which of a rank's
parameters it writes: a parameter replicated over the tensor-parallel group is written by
tensor-parallel rank 0, one tied across two pipeline stages by the lower global rank, and (in
ZeRO stage 0) replicated flat buffers by data-parallel rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from parallax.parallel.state import ParallelState

__all__ = ["CheckpointError", "Place", "Region", "RankRole"]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or a corrupted one; the message names the problem."""


def _rows_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as rows: a 0-dim tensor is one row of one element."""
    return tuple(shape) if len(shape) else (1,)


@dataclass(frozen=True)
class Place:
    """A rank's copy of a parameter as part of the full tensor of ``shape``: the whole tensor
    (``dim`` None), or elements ``[start, end)`` along dimension ``dim``."""

    shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    end: int = 0

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        return self.shape[:self.dim] + (self.end - self.start,) + self.shape[self.dim + 1:]

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def box(self) -> list[tuple[int, int]]:
        """Per dimension (rows view), the ``[lo, hi)`` of the full tensor this place covers."""
        box = [(0, n) for n in _rows_shape(self.shape)]
        if self.dim is not None:
            box[self.dim] = (self.start, self.end)
        return box

    def to_json(self) -> dict[str, int] | None:
        """The manifest's ``"slice"`` of a piece (None: the whole tensor)."""
        return None if self.dim is None else {"dim": self.dim, "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, shape: Sequence[int], saved: dict[str, int] | None) -> "Place":
        if saved is None:
            return cls(tuple(shape))
        return cls(tuple(shape), saved["dim"], saved["start"], saved["end"])


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    out = [(max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b)]
    return out if all(lo < hi for lo, hi in out) else None


@dataclass(frozen=True)
class _Read:
    """Flat elements ``[start, end)`` of the saved ``place``; as rows, their part ``src`` goes to
    ``dst`` of the needed block (both None: the read is the answer itself)."""

    place: Place
    start: int
    end: int
    src: tuple[slice, ...] | None = None
    dst: tuple[slice, ...] | None = None


class Region:
    """Flat elements ``[start, end)`` of a parameter's ``target`` place, planned as reads of the
    places it was saved at.

    Only whole rows (the first dimension) of the target covering the range are assembled, and
    from each saved place only the rows that overlap them are read.
    """

    def __init__(self, name: str, saved: Iterable[Place], target: Place, start: int, end: int) -> None:
        saved = list(saved)
        self.start, self.end = start, end
        if target in saved:  # saved at this very place (no resharding over tensor parallelism)
            self.reads = [_Read(target, start, end)]
            return
        rows_t = _rows_shape(target.local_shape)
        inner_t = math.prod(rows_t[1:])
        self.first_row = start // inner_t if inner_t else 0
        last_row = -(-end // inner_t) if inner_t else 0
        box = target.box()
        need = [(box[0][0] + self.first_row, box[0][0] + last_row)] + box[1:]
        self.need_shape = [hi - lo for lo, hi in need]
        self.offset = self.first_row * inner_t
        self.reads = []
        covered = 0
        for place in saved:
            inter = _intersect(need, place.box())
            if inter is None:
                continue
            pbox, rows_p = place.box(), _rows_shape(place.local_shape)
            inner_p = math.prod(rows_p[1:])
            r0, r1 = inter[0][0] - pbox[0][0], inter[0][1] - pbox[0][0]
            src = (slice(None),) + tuple(slice(lo - p[0], hi - p[0]) for (lo, hi), p in zip(inter[1:], pbox[1:]))
            dst = tuple(slice(lo - n[0], hi - n[0]) for (lo, hi), n in zip(inter, need))
            self.reads.append(_Read(place, r0 * inner_p, r1 * inner_p, src, dst))
            covered += math.prod(hi - lo for lo, hi in inter)
        if covered != math.prod(self.need_shape):
            raise CheckpointError(f"elements {start}..{end} of {name} (place {target}) are in no shard, or in "
                                  f"several: the checkpoint's slices of it do not tile the full tensor")

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The region's elements (flat) from the tensors ``self.reads`` returned, in order."""
        first = self.reads[0]
        if first.src is None:
            return parts[0]
        out = torch.empty(self.need_shape, dtype=parts[0].dtype)
        for read, part in zip(self.reads, parts):
            rows = part.reshape((-1,) + _rows_shape(read.place.local_shape)[1:])
            out[read.dst] = rows[read.src]
        return out.reshape(-1)[self.start - self.offset: self.end - self.offset]


class RankRole:
    """This rank's share of a checkpoint, from the model's ``ParallelState`` (None: a plain
    data-parallel model, every rank of the ZeRO group ``dp_rank`` holding every parameter)."""

    def __init__(self, state: ParallelState | None, dp_rank: int) -> None:
        self.state = state
        self.dp_rank = dp_rank
        dims = state.mesh.dims if state is not None else None
        self.tp = dims.tp if dims is not None else 1
        self.tp_rank = state.mesh.tp_rank if state is not None else 0
        self.pipeline_stage = dims is not None and dims.pp > 1

    @property
    def saves_replicated(self) -> bool:
        """True on the rank that writes what its data- and tensor-parallel peers hold too (module
        buffers, frozen parameters, ZeRO-0 flat buffers): one per pipeline stage."""
        return self.dp_rank == 0 and self.tp_rank == 0

    def _tp_dim(self, name: str) -> int | None:
        if self.state is None or self.tp == 1:
            return None
        return self.state.tp_dims.get(name)

    def saves(self, name: str) -> bool:
        """Whether this rank writes its copy of parameter ``name`` (peers may hold the same one)."""
        if self.state is None:
            return True
        if name in self.state.pp_tied and self.state.pp_tied[name] < self.state.mesh.rank:
            return False  # the other pipeline stage holding it writes it
        return self._tp_dim(name) is not None or self.tp_rank == 0

    def tied_elsewhere(self) -> dict[str, int]:
        """Parameters also held by another pipeline stage: name -> that stage's global rank."""
        return dict(self.state.pp_tied) if self.state is not None else {}

    def saved_place(self, name: str, local_shape: Sequence[int]) -> Place:
        """Where this rank's copy (of ``local_shape``) of ``name`` sits in the full tensor."""
        dim = self._tp_dim(name)
        if dim is None:
            return Place(tuple(local_shape))
        size = local_shape[dim]
        full = tuple(local_shape[:dim]) + (size * self.tp,) + tuple(local_shape[dim + 1:])
        return Place(full, dim, self.tp_rank * size, (self.tp_rank + 1) * size)

    def target_place(self, name: str, full_shape: Sequence[int], local_shape: Sequence[int]) -> Place:
        """Where this rank's copy of ``name`` sits in a full tensor of ``full_shape`` (the
        checkpoint's); CheckpointError when the model's copy does not fit it."""
        full = tuple(full_shape)
        dim = self._tp_dim(name)
        if dim is None:
            place = Place(full)
        else:
            if dim >= len(full) or full[dim] % self.tp:
                raise CheckpointError(f"parameter {name}: the checkpoint's full shape {full} does not split into "
                                      f"tp={self.tp} equal slices along dim {dim} (first mismatch)")
            size = full[dim] // self.tp
            place = Place(full, dim, self.tp_rank * size, (self.tp_rank + 1) * size)
        if place.local_shape != tuple(local_shape):
            split = "" if dim is None else f" (its slice {self.tp_rank} of tp={self.tp} along dim {dim})"
            raise CheckpointError(f"parameter {name}: the checkpoint holds shape {full}, the model "
                                  f"{tuple(local_shape)}{split} where {place.local_shape} was expected "
                                  "(first mismatch)")
        return place


def merge_meta(shards: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    """The whole model's parameters (full shapes), aliases and buffers from every rank's index.

    A parameter tied across pipeline stages is listed once, under the name of the rank that
    wrote it; the other stage's name becomes an alias of it.
    """
    params: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    buffers: dict[str, dict] = {}
    for shard in shards:
        for name, meta in shard["params"].items():
            if name in params and params[name]["shape"] != meta["shape"]:
                raise CheckpointError(f"parameter {name}: rank {shard['rank']} holds full shape {meta['shape']}, "
                                      f"another rank {params[name]['shape']}")
            params.setdefault(name, meta)
        aliases.update(shard["aliases"])
        for name, meta in shard["buffers"].items():
            buffers.setdefault(name, {**meta, "file": shard["file"]})
    by_rank = {shard["rank"]: shard for shard in shards}
    for shard in shards:
        for name, other in shard["pp_tied"].items():
            if other > shard["rank"]:
                continue  # this rank wrote it
            partner = [n for n, r in by_rank.get(other, {"pp_tied": {}})["pp_tied"].items() if r == shard["rank"]]
            if not partner:
                raise CheckpointError(f"rank {shard['rank']}'s parameter {name} is tied to rank {other} "
                                      f"(ParallelState.pp_tied), which names no parameter tied back to it")
            if partner[0] != name:
                aliases[name] = partner[0]
    return params, aliases, buffers


def check_coverage(params: dict[str, dict], shards: list[dict[str, Any]]) -> None:
    """Every element of every parameter is written exactly once (a parameter held by two
    pipeline stages but missing from ``pp_tied`` would be written twice)."""
    saved: dict[str, dict[Any, list[tuple[int, int]]]] = {}
    for shard in shards:
        for entry in shard["entries"]:
            key = None if entry.get("slice") is None else tuple(sorted(entry["slice"].items()))
            saved.setdefault(entry["name"], {}).setdefault(key, []).append((entry["start"], entry["end"]))
    for name, meta in params.items():
        total = 0
        for ranges in saved.get(name, {}).values():
            ranges.sort()
            for (_, end), (start, _) in zip(ranges, ranges[1:]):
                if start < end:
                    raise CheckpointError(f"parameter {name} is written by two ranks (a parameter that two pipeline "
                                          "stages hold must be declared in ParallelState.pp_tied)")
            total += sum(b - a for a, b in ranges)
        if total != math.prod(meta["shape"]):
            raise CheckpointError(f"parameter {name}: the ranks wrote {total} of its {math.prod(meta['shape'])} "
                                  "elements")
