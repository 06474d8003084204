"""Stage 3: gather each unit's parameters for its forward and its backward, prefetching ahead.

A forward pre-hook all-gathers the unit (waiting for its prefetch if one is in flight) and
starts gathering the next ``prefetch`` units of the order recorded in the previous iteration;
a forward hook frees the unit again and arms a pre-backward hook on its outputs, which
re-gathers it (and prefetches in the recorded backward order) just before autograd reaches
the unit. After the unit's gradients are reduced it is freed. The root unit (the model's own
parameters, e.g. embeddings and a tied head) stays gathered from its forward to the end of
backward. Orders are re-recorded every iteration: when the actual order differs from the
prediction, the unit is gathered on demand and the new order is used next time. Every rank
runs the same order, so the collectives stay matched and nothing waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from parallax.zero.comm import Pending
from parallax.zero.flat import FlatBuffer

__all__ = ["Unit", "UnitGatherer"]


@dataclass(eq=False)
class Unit:
    index: int
    module: nn.Module
    buffers: list[FlatBuffer]
    is_root: bool
    pending: list[Pending] = field(default_factory=list)
    backward_armed: bool = False

    @property
    def gathered(self) -> bool:
        return all(b.gathered for b in self.buffers)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class UnitGatherer:
    def __init__(self, units: list[Unit], prefetch: int) -> None:
        self.units = units
        self.prefetch = prefetch
        self._forward: list[int] = []
        self._backward: list[int] = []
        self._last_forward: list[int] = []
        self._last_backward: list[int] = []
        self.order_changes = 0  # how often the recorded order mispredicted (for tests and logs)
        self._handles = []
        for unit in units:
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_forward(unit)))
            self._handles.append(unit.module.register_forward_hook(self._post_forward(unit)))

    # ---------------------------------------------------------------- gather / free

    def _gather(self, unit: Unit) -> None:
        if unit.pending:
            for pending in unit.pending:
                pending.wait()
            unit.pending = []
        elif not unit.gathered:
            for pending in [b.gather() for b in unit.buffers]:
                pending.wait()

    def _prefetch(self, unit: Unit) -> None:
        if not unit.gathered and not unit.pending:
            unit.pending = [b.gather() for b in unit.buffers]

    def free(self, unit: Unit) -> None:
        if unit.pending:  # a prefetch in flight must land before its memory is released
            for pending in unit.pending:
                pending.wait()
            unit.pending = []
        for b in unit.buffers:
            if b.gathered:
                b.free()

    def free_all(self) -> None:
        for unit in self.units:
            self.free(unit)
            unit.backward_armed = False

    def _prefetch_next(self, recorded: list[int], current: list[int]) -> None:
        """Prefetch what followed ``current``'s prefix in the recorded order, if it still matches."""
        pos = len(current)
        if not recorded or recorded[:pos] != current:
            if recorded:
                self.order_changes += 1
            return
        for index in recorded[pos: pos + self.prefetch]:
            self._prefetch(self.units[index])

    # ---------------------------------------------------------------- hooks

    def _pre_forward(self, unit: Unit):
        def hook(module, args):
            if _in_backward():  # activation-checkpoint recompute: gathered, not a new iteration
                self._gather(unit)
                return
            if unit.is_root:
                self.end_iteration()
            self._forward.append(unit.index)
            self._gather(unit)
            self._prefetch_next(self._last_forward, self._forward)

        return hook

    def _post_forward(self, unit: Unit):
        def hook(module, args, output):
            if _in_backward():
                return None  # recompute: backward, which is running, still needs the parameters
            if not torch.is_grad_enabled():
                if unit.is_root:  # inference forward: release everything
                    self.free_all()
                else:
                    self.free(unit)
                return None
            if unit.is_root:
                return None  # stays gathered until the end of backward
            self.free(unit)
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            for t in tensors:
                t.register_hook(self._pre_backward(unit))
            return None

        return hook

    def _pre_backward(self, unit: Unit):
        def hook(grad):
            if not unit.backward_armed:
                unit.backward_armed = True
                self._backward.append(unit.index)
                self._gather(unit)
                # First iteration: predict the backward order as the reverse of forward's.
                recorded = self._last_backward or [i for i in reversed(self._forward) if not self.units[i].is_root]
                self._prefetch_next(recorded, self._backward)
            return None

        return hook

    def unit_reduced(self, unit: Unit) -> None:
        """All of the unit's gradients are being reduced: its parameters are no longer needed."""
        if not unit.is_root:
            self.free(unit)

    def end_iteration(self) -> None:
        """Free everything and keep this iteration's orders as the next one's prediction."""
        self.free_all()
        if self._forward:
            self._last_forward = self._forward
        if self._backward:
            self._last_backward = self._backward
        self._forward, self._backward = [], []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
