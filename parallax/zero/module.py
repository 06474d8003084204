"""``shard(model, stage)``: turn any ``nn.Module`` into a ZeRO data-parallel module, in place.

Stages 0-2 pack the trainable parameters into buckets of ``bucket_mb`` (in reverse
registration order, roughly the order backward produces gradients); stage 3 packs them per
unit (each repeated block by default, plus the root for everything else) and shards them.
Parameter names, shapes and identities are unchanged; tied parameters are stored once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallax.zero.comm import Comm
from parallax.zero.flat import FlatBuffer
from parallax.zero.gather import Unit, UnitGatherer
from parallax.zero.grads import GradientReducer

__all__ = ["STAGES", "ZeroState", "ZeroModule", "shard", "zero_state", "default_units"]

log = logging.getLogger(__name__)
STAGES = (0, 1, 2, 3)
LAUNCH_HINT = ("launch with `torchrun --nproc_per_node N script.py` (or `parallax train --nproc N`) and call "
               "torch.distributed.init_process_group() first; a single process can use a group of world size 1")


@dataclass(eq=False)
class ZeroState:
    """What ``shard`` attached to the model: buffers, hooks and the process group."""

    stage: int
    comm: Comm
    buffers: list[FlatBuffer]
    reducer: GradientReducer
    gatherer: UnitGatherer | None
    units: list[Unit]
    prefetch: int
    bucket_mb: float


class ZeroModule:
    """Mixin added to the class of a sharded model (as FSDP2 does): gradient-sync control."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        """False for gradient-accumulation micro-steps: gradients then only accumulate locally."""
        zero_state(self).reducer.sync = bool(requires_gradient_sync)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next synced one reduces them."""
        reducer = zero_state(self).reducer
        previous, reducer.sync = reducer.sync, False
        try:
            yield
        finally:
            reducer.sync = previous


def zero_state(model: nn.Module) -> ZeroState:
    state = getattr(model, "_parallax_zero", None)
    if state is None:
        raise ValueError("this model is not sharded: call px.zero.shard(model, stage=...) or px.initialize first")
    return state


def default_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: members of each outermost ModuleList/Sequential of >= 2 modules of one
    class, or of each ModuleDict keyed by block indices (a pipeline stage's blocks, which keep their
    full-model names; one block is enough there), each module once: a block that a list holds at several positions
    (cross-layer sharing, ``share_layers``) is one unit, gathered for each of its calls."""
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue  # inside a block already chosen: units must not nest
        children = _block_list(module)
        if len(children) >= (1 if isinstance(module, nn.ModuleDict) else 2):
            if len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
                units.extend(c for i, c in enumerate(children) if all(c is not d for d in children[:i]))
                taken.append(name)
    return units


def _block_list(module: nn.Module) -> list[nn.Module]:
    """The members of a ModuleList/Sequential, or of a ModuleDict keyed by block indices; else []."""
    if isinstance(module, (nn.ModuleList, nn.Sequential)):
        return list(module)
    if isinstance(module, nn.ModuleDict) and len(module) and all(key.isdigit() for key in module.keys()):
        return list(module.values())
    return []


def _check(model: nn.Module, stage: int, prefetch: int, bucket_mb: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"ZeRO needs an initialised torch.distributed process group: {LAUNCH_HINT}")
    if getattr(model, "_parallax_zero", None) is not None:
        raise ValueError("this model is already sharded")


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module, comm: Comm) -> None:
    """Every rank starts from rank 0's parameters and buffers, as DDP does."""
    if comm.world_size == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        comm.broadcast(t.detach(), what="broadcast of initial parameters").wait()


# The first bucket (the last layers, whose gradients come first) is small, as in DDP, so that
# reduction starts early in backward instead of after the whole model (bench zero: one 25 MB
# bucket for a 12 MB model meant no overlap at all).
FIRST_BUCKET_MB = 1.0


def _buckets(named: list[tuple[str, nn.Parameter]], bucket_mb: float) -> list[list[tuple[str, nn.Parameter]]]:
    out: list[list[tuple[str, nn.Parameter]]] = []
    size = 0.0
    for name, p in reversed(named):
        current = out[-1] if out else None
        limit = min(bucket_mb, FIRST_BUCKET_MB if len(out) == 1 else bucket_mb) * 2**20
        fits = current is not None and size < limit and (current[0][1].dtype, current[0][1].device) == (p.dtype, p.device)
        if not fits:
            out.append([])
            size = 0.0
        out[-1].append((name, p))
        size += p.numel() * p.element_size()
    return out


def _unit_params(model: nn.Module, modules: Sequence[nn.Module]) -> list[list[tuple[str, nn.Parameter]]]:
    """Parameters per unit, the root (index 0) holding all that no single unit owns alone."""
    owner: dict[int, int] = {}
    for u, module in enumerate(modules, start=1):
        for p in module.parameters():
            owner[id(p)] = u if owner.get(id(p), u) == u else 0  # shared by two units -> root
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(modules) + 1)]
    for name, p in model.named_parameters():
        groups[owner.get(id(p), 0)].append((name, p))
    return groups


def shard(model: nn.Module, stage: int = 3, group: dist.ProcessGroup | None = None, prefetch: int = 1,
          bucket_mb: float = 25.0, units: Sequence[nn.Module] | None = None, timeout_s: float = 600.0) -> nn.Module:
    """Shard ``model`` over ``group`` (default: the world) with ZeRO ``stage``; returns the same object.

    A tensor- or pipeline-parallel model (``parallax.parallel``) is sharded over its mesh's
    data-parallel group unless ``group`` is given. Stage 0: plain data parallelism (gradients all-reduced). Stage 1: optimizer state sharded.
    Stage 2: and gradients (reduce-scattered in ``bucket_mb`` buckets during backward). Stage 3:
    and parameters, per unit (``units``, default: the repeated blocks), gathered for each
    unit's forward and backward with ``prefetch`` units gathered ahead. Collectives fail after
    ``timeout_s`` with a clear error instead of hanging. Call it after moving the model to its
    device, then build the optimizer with ``ZeroOptimizer(model, ...)``.
    """
    _check(model, stage, prefetch, bucket_mb)
    parallel = getattr(model, "_parallax_parallel", None)  # set by parallax.parallel (tensor/pipeline)
    if group is None and parallel is not None:
        # The other ranks of the world hold other slices or stages: shard over the replicas only.
        group = parallel.mesh.dp_group
    comm = Comm(group, timeout_s)
    _broadcast_from_rank0(model, comm)

    buffers: list[FlatBuffer] = []
    unit_list: list[Unit] = []
    if stage == 3:
        modules = list(units) if units is not None else default_units(model)
        for u, named in enumerate(_unit_params(model, modules)):
            module = model if u == 0 else modules[u - 1]
            by_kind: dict[tuple, list] = {}
            for name, p in named:
                by_kind.setdefault((p.dtype, p.device), []).append((name, p))
            unit_buffers = []
            for members in by_kind.values():
                unit_buffers.append(FlatBuffer(len(buffers), members, comm, stage))
                buffers.append(unit_buffers[-1])
            unit_list.append(Unit(u, module, unit_buffers, is_root=(u == 0)))
    else:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for members in _buckets(trainable, bucket_mb):
            buffers.append(FlatBuffer(len(buffers), members, comm, stage))

    gatherer = UnitGatherer(unit_list, prefetch) if stage == 3 else None
    reducer = GradientReducer([b for b in buffers if b.num_trainable], comm, stage,
                              gatherer.end_backward if gatherer is not None else None)
    model._parallax_zero = ZeroState(stage, comm, buffers, reducer, gatherer, unit_list, prefetch, bucket_mb)
    cls = type(model)
    if not issubclass(cls, ZeroModule):
        model.__class__ = type(f"Zero{cls.__name__}", (ZeroModule, cls), {})
    log.info("zero: stage %d, %d flat buffer(s), %d unit(s), world size %d", stage, len(buffers),
             len(unit_list), comm.world_size)
    return model
