"""``ParallelState``: what tensor and pipeline parallelism attached to a model, for ZeRO, the
gradient norm and checkpoints to read (the model's own code never does)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from parallax.parallel.mesh import Mesh

__all__ = ["ParallelState", "parallel_state", "attach_parallel_state", "tp_slice"]

ATTRIBUTE = "_parallax_parallel"


def tp_slice(size: int, tp: int, rank: int) -> tuple[int, int]:
    """The [start, end) of dimension ``size`` that tensor-parallel rank ``rank`` of ``tp`` holds:
    torch.chunk's split (chunks of ceil(size / tp), the last ones smaller), so a vocabulary that tp
    does not divide (the byte tokenizer's 257 ids) still splits."""
    chunk = -(-size // tp)
    return min(size, rank * chunk), min(size, (rank + 1) * chunk)


@dataclass(eq=False)
class ParallelState:
    """Per-parameter placement over the mesh, by parameter name (``model.named_parameters()``).

    ``tp_dims``: parameters split over the tensor-parallel group, name -> the dimension split
    (this rank holds ``tp_slice(full size, tp, tp_rank)`` of it); every other parameter is
    replicated over it. ``full_shapes``: the unsplit shape of each parameter in ``tp_dims`` (a
    local slice alone does not tell an uneven split's full size). ``tp_sections``: parameters split
    section by section (a fused q, k, v projection), name -> the full sizes of the sections along
    the split dimension: this rank holds its slice of each section, side by side. ``tp_partial_grads``: replicated parameters whose gradient each
    tensor-parallel rank computes only a part of (sequence-parallel norms: each rank sees a slice
    of the sequence), summed over the group before the optimizer step. ``pp_tied``: parameters
    also held by another pipeline stage (tied input embedding / LM head), name -> the global rank
    of the other holder: their gradients are summed over both before the step, and only the first
    stage's copy counts in the gradient norm. ``sequence_parallel``: the activations between
    tensor-parallel regions are split along the sequence.
    """

    mesh: Mesh
    tp_dims: dict[str, int] = field(default_factory=dict)
    full_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tp_sections: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tp_partial_grads: set[str] = field(default_factory=set)
    pp_tied: dict[str, int] = field(default_factory=dict)
    sequence_parallel: bool = False

    def norm_weight(self, name: str) -> float:
        """The share of parameter ``name``'s squared gradient this rank adds to the global norm, so
        that summing over every rank of the mesh counts each element once."""
        if name in self.pp_tied and not self.mesh.is_first_stage:
            return 0.0
        if name in self.tp_dims:
            return 1.0
        return 1.0 / self.mesh.dims.tp

    @property
    def norm_groups(self) -> list:
        """Groups over which the gradient norm and the inf/NaN flag are reduced besides the
        data-parallel one."""
        return self.mesh.model_parallel_groups


def parallel_state(model: nn.Module) -> ParallelState | None:
    """The state tensor/pipeline parallelism attached to ``model``, or None."""
    return getattr(model, ATTRIBUTE, None)


def attach_parallel_state(model: nn.Module, state: ParallelState) -> None:
    setattr(model, ATTRIBUTE, state)
