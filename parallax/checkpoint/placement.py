"""Where a rank's parameters sit in the full model, for checkpoints of tensor-, pipeline- and
data-parallel (3D) models.

A rank holds a parameter whole or, under tensor parallelism, as one slice of the full tensor
along one dimension (``parallax.parallel.state.tp_slice``: chunks of ceil(n / tp)), or one slice
of each of several sections side by side (a fused q, k, v projection): a ``Place``. A checkpoint records each saved piece with its place, so a
rank of another ``(pp, dp, tp)`` layout finds the elements of its own place in the saved
slices (``Region``), reading only the rows it needs. ``RankRole`` says which of a rank's
parameters it writes: a parameter replicated over the tensor-parallel group is written by
tensor-parallel rank 0, one tied across two pipeline stages by the lower global rank, and (in
ZeRO stage 0) replicated flat buffers by data-parallel rank 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from parallax.parallel.state import ParallelState, tp_slice

__all__ = ["CheckpointError", "Place", "Region", "RankRole"]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or a corrupted one; the message names the problem."""


def _rows_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as rows: a 0-dim tensor is one row of one element."""
    return tuple(shape) if len(shape) else (1,)


@dataclass(frozen=True)
class Place:
    """A rank's copy of a parameter as part of the full tensor of ``shape``: the whole tensor
    (``dim`` None), elements ``[start, end)`` along dimension ``dim``, or with ``sections`` (the
    full sizes of sections along ``dim``) tensor-parallel rank ``rank`` of ``tp``'s slice of each
    section, side by side."""

    shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    end: int = 0
    sections: tuple[int, ...] | None = None
    rank: int = 0
    tp: int = 1

    def segments(self) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` ranges along ``dim`` of the full tensor that this copy holds, in order."""
        if self.sections is None:
            return [(self.start, self.end)]
        out, offset = [], 0
        for size in self.sections:
            lo, hi = tp_slice(size, self.tp, self.rank)
            out.append((offset + lo, offset + hi))
            offset += size
        return out

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        size = sum(hi - lo for lo, hi in self.segments())
        return self.shape[:self.dim] + (size,) + self.shape[self.dim + 1:]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This place's copy (``local_shape``) cut out of the ``full`` tensor."""
        if self.dim is None:
            return full
        return torch.cat([full.narrow(self.dim, lo, hi - lo) for lo, hi in self.segments()], self.dim)

    def put(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """Write this place's copy ``local`` into its part of ``full``."""
        if self.dim is None:
            full.copy_(local)
            return
        at = 0
        for lo, hi in self.segments():
            full.narrow(self.dim, lo, hi - lo).copy_(local.narrow(self.dim, at, hi - lo))
            at += hi - lo

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def box(self) -> list[tuple[int, int]]:
        """Per dimension (rows view), the ``[lo, hi)`` of the full tensor this place covers."""
        box = [(0, n) for n in _rows_shape(self.shape)]
        if self.dim is not None:
            box[self.dim] = (self.start, self.end)
        return box

    def to_json(self) -> dict[str, Any] | None:
        """The manifest's ``"slice"`` of a piece (None: the whole tensor)."""
        if self.dim is None:
            return None
        if self.sections is not None:
            return {"dim": self.dim, "sections": list(self.sections), "rank": self.rank, "tp": self.tp}
        return {"dim": self.dim, "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, shape: Sequence[int], saved: dict[str, Any] | None) -> "Place":
        if saved is None:
            return cls(tuple(shape))
        if "sections" in saved:
            return cls(tuple(shape), saved["dim"], sections=tuple(saved["sections"]), rank=saved["rank"],
                       tp=saved["tp"])
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
        self.target = target
        self.whole = False
        if target in saved:  # saved at this very place (no resharding over tensor parallelism)
            self.reads = [_Read(target, start, end)]
            return
        if target.sections is not None or any(place.sections is not None for place in saved):
            # Sectioned slices are not boxes of the full tensor: rebuild the parameter, then cut.
            self.whole = True
            self.reads = [_Read(place, 0, place.numel) for place in saved]
            if sum(place.numel for place in saved) != math.prod(target.shape):
                raise CheckpointError(f"{name}: the checkpoint's slices of it do not tile the full tensor "
                                      f"{target.shape}")
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
        if self.whole:
            full = torch.empty(self.target.shape, dtype=parts[0].dtype)
            for read, part in zip(self.reads, parts):
                read.place.put(full, part.reshape(read.place.local_shape))
            return self.target.take(full).reshape(-1)[self.start: self.end]
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
        even = tuple(local_shape[:dim]) + (local_shape[dim] * self.tp,) + tuple(local_shape[dim + 1:])
        return self._split_place(name, tuple(self.state.full_shapes.get(name, even)), dim)

    def _split_place(self, name: str, full: tuple[int, ...], dim: int) -> Place:
        sections = self.state.tp_sections.get(name)
        if sections is not None:
            if sum(sections) != full[dim]:
                raise CheckpointError(f"parameter {name}: its sections {tuple(sections)} do not add up to the full "
                                      f"shape {full} along dim {dim}")
            return Place(full, dim, sections=tuple(sections), rank=self.tp_rank, tp=self.tp)
        start, end = tp_slice(full[dim], self.tp, self.tp_rank)
        return Place(full, dim, start, end)

    def target_place(self, name: str, full_shape: Sequence[int], local_shape: Sequence[int]) -> Place:
        """Where this rank's copy of ``name`` sits in a full tensor of ``full_shape`` (the
        checkpoint's); CheckpointError when the model's copy does not fit it."""
        full = tuple(full_shape)
        dim = self._tp_dim(name)
        if dim is None:
            place = Place(full)
        else:
            if dim >= len(full) or full[dim] < self.tp:
                raise CheckpointError(f"parameter {name}: the checkpoint's full shape {full} does not split into "
                                      f"tp={self.tp} slices along dim {dim} (first mismatch)")
            place = self._split_place(name, full, dim)
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
            key = None if entry.get("slice") is None else json.dumps(entry["slice"], sort_keys=True)
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
