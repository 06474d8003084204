"""The device mesh ``(pp, dp, tp)``: which ranks form each tensor-, data- and pipeline-parallel group.

Ranks are laid out with the tensor-parallel dimension innermost (``rank = (pp_rank * dp +
dp_rank) * tp + tp_rank``), so with ``nproc`` ranks per node and ``tp <= nproc`` a tensor-parallel
group (the one that communicates in every layer) stays within a node, and pipeline stages
(point-to-point only, once per micro-batch) go across nodes: Megatron-LM's and torchtitan's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

__all__ = ["ParallelDims", "Mesh", "init_mesh"]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of pipeline (``pp``), data (``dp``) and tensor (``tp``) parallelism; their product
    is the world size."""

    pp: int = 1
    dp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "tp"):
            _positive(name, getattr(self, name))

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """The mesh with ``tp`` and ``pp`` whose remaining dimension (data parallelism) fills
        ``world_size``; a clear error when ``tp * pp`` does not divide it."""
        _positive("world_size", world_size)
        _positive("tp", tp)
        _positive("pp", pp)
        if world_size % (tp * pp):
            raise ValueError(f"the mesh tp={tp} x pp={pp} = {tp * pp} ranks does not divide the world size "
                             f"{world_size} (nnodes x nproc): the data-parallel degree would not be a whole number")
        return cls(pp=pp, dp=world_size // (tp * pp), tp=tp)

    def check_world(self, world_size: int) -> None:
        """Raise ValueError unless pp x dp x tp equals ``world_size``."""
        if self.world_size != world_size:
            raise ValueError(f"the mesh pp={self.pp} x dp={self.dp} x tp={self.tp} = {self.world_size} ranks does not "
                             f"match the world size {world_size}")

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of global ``rank``."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank


@dataclass(eq=False)
class Mesh:
    """This rank's place in the mesh and its process groups (``None`` group: the world, when that
    dimension spans it). ``pp_ranks`` lists the global ranks of this rank's pipeline (stage order)."""

    dims: ParallelDims
    rank: int
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    pp_ranks: list[int] = field(default_factory=list)

    @property
    def pp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def model_parallel_groups(self) -> list[dist.ProcessGroup | None]:
        """The tensor- and pipeline-parallel groups of more than one rank (a gradient norm or an
        inf/NaN flag is reduced over these besides the data-parallel group)."""
        return [g for g, n in ((self.tp_group, self.dims.tp), (self.pp_group, self.dims.pp)) if n > 1]


def init_mesh(dims: ParallelDims) -> Mesh:
    """Create the process groups of ``dims`` on the initialised world group (every rank calls it,
    with the same ``dims``). A dimension of size 1 gets a group of its own rank; one that spans
    the world uses the world group."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs an initialised torch.distributed process group "
                           "(launch with torchrun or `parallax train --nproc N`)")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims.check_world(world)
    groups: dict[str, dist.ProcessGroup | None] = {}
    pp_ranks: list[int] = []
    # Every rank must create every group, in the same order (new_group is collective).
    for axis in ("tp", "dp", "pp"):
        for members in _axis_groups(dims, axis):
            group = None if len(members) == world else dist.new_group(members)
            if rank in members:
                groups[axis] = group
                if axis == "pp":
                    pp_ranks = members
    return Mesh(dims, rank, groups["tp"], groups["dp"], groups["pp"], pp_ranks)


def _axis_groups(dims: ParallelDims, axis: str) -> list[list[int]]:
    """The global ranks of each group along ``axis``, in a fixed order."""
    out = []
    if axis == "tp":
        for p in range(dims.pp):
            for d in range(dims.dp):
                out.append([dims.rank_of(p, d, t) for t in range(dims.tp)])
    elif axis == "dp":
        for p in range(dims.pp):
            for t in range(dims.tp):
                out.append([dims.rank_of(p, d, t) for d in range(dims.dp)])
    else:
        for d in range(dims.dp):
            for t in range(dims.tp):
                out.append([dims.rank_of(p, d, t) for p in range(dims.pp)])
    return out
