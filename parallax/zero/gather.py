"""Stage 3: gather each unit's parameters for its forward and its backward, prefetching ahead.

A forward pre-hook all-gathers the unit (waiting for its prefetch if one is in flight), starts
gathering the next ``prefetch`` units of the order recorded in the previous iteration, and
routes the unit's inputs that require grad through an identity autograd node whose backward
runs once autograd is done with the unit (``run_after_backward``, as FSDP2 does). A forward
hook frees the unit and arms a pre-backward hook on its outputs, which re-gathers it (and
prefetches in the recorded backward order) just before autograd reaches the unit. The unit is
freed again once its whole backward has run: frozen parameters are needed until then (for the
gradients of the unit's inputs), whether or not its gradients are reduced in this backward
(``no_sync``), and whether it has trainable parameters at all. A unit whose inputs need no
gradient (the first block after a frozen embedding) has no such point and is freed at the end
of backward, with the root unit (the model's own parameters, e.g. embeddings and a tied head),
which stays gathered from its forward to the end of backward. A forward that activation
checkpointing re-runs inside backward only makes sure the unit is gathered: the original
forward recorded the order and armed the free after backward.

Orders are re-recorded every iteration: when the actual order differs from the prediction, the
unit is gathered on demand and the new order is used next time. Every rank runs the same
order, so the collectives stay matched and nothing waits forever. ``UnitGatherer.gathers``
counts how each gather was served, so that prefetching can be checked.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from parallax.zero.comm import Pending
from parallax.zero.flat import FlatBuffer

__all__ = ["Unit", "UnitGatherer", "run_after_backward"]

# How a gather found its unit (the keys of ``UnitGatherer.gathers``, with the phase).
PREFETCHED, ON_DEMAND, RESIDENT = "prefetched", "on_demand", "resident"


@dataclass(eq=False)
class Unit:
    index: int
    module: nn.Module
    buffers: list[FlatBuffer]
    is_root: bool
    pending: list[Pending] = field(default_factory=list)
    backward_armed: bool = False
    # A token per forward call whose backward has not run yet. Each is held by its call's
    # autograd graph: a call whose graph is dropped unused (a forward without backward) vanishes.
    backward_calls: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    @property
    def gathered(self) -> bool:
        return all(b.gathered for b in self.buffers)


class _Call:
    """Stands for one forward call of a unit until its backward has run (see ``Unit.backward_calls``)."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class _AfterBackward(torch.autograd.Function):
    """Identity on a module's inputs; its backward runs once every gradient flowing back into
    them is computed, i.e. after the module's backward."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.callback = callback
        # Not the inputs themselves: autograd would make them views, which the module could
        # then not modify in place.
        return tuple(t.detach() for t in inputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.callback()
        return (None, *grads)


def run_after_backward(callback: Callable[[], None], args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A module's forward arguments, rewired so that ``callback()`` runs after its backward.

    The tensors among ``args`` and ``kwargs`` (nested in containers too) that require grad go
    through one identity autograd node; returns the new ``(args, kwargs)`` for a forward
    pre-hook registered ``with_kwargs=True``, or None when no input requires grad (then no
    gradient flows back into the inputs and nothing marks the end of the module's backward).
    """
    flat, spec = tree_flatten((args, kwargs))
    where = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not where:
        return None
    for i, t in zip(where, _AfterBackward.apply(callback, *(flat[i] for i in where))):
        flat[i] = t
    return tree_unflatten(flat, spec)


class UnitGatherer:
    def __init__(self, units: list[Unit], prefetch: int) -> None:
        self.units = units
        self.prefetch = prefetch
        self._forward: list[int] = []
        self._backward: list[int] = []
        self._last_forward: list[int] = []
        self._last_backward: list[int] = []
        self.order_changes = 0  # how often the recorded order mispredicted (for tests and logs)
        # (phase, how) -> number of non-root unit gathers: phase "forward" or "backward", how
        # PREFETCHED (its all-gather was in flight when the unit ran), ON_DEMAND or RESIDENT
        # (already gathered; counted once per unit and backward).
        self.gathers: Counter[tuple[str, str]] = Counter()
        self._handles = []
        for unit in units:
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_forward(unit), with_kwargs=True))
            self._handles.append(unit.module.register_forward_hook(self._post_forward(unit)))

    # ---------------------------------------------------------------- gather / free

    def _gather(self, unit: Unit) -> str:
        """Make the unit's parameters resident; says how (PREFETCHED, ON_DEMAND or RESIDENT)."""
        if unit.pending:
            for pending in unit.pending:
                pending.wait()
            unit.pending = []
            return PREFETCHED
        if unit.gathered:
            return RESIDENT
        for pending in [b.gather() for b in unit.buffers]:
            pending.wait()
        return ON_DEMAND

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
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if _in_backward():
                # Activation-checkpoint recompute: the unit's backward is running (or about to),
                # so it stays gathered until that ends; this is not a new forward to record.
                self._gather(unit)
                return None
            if unit.is_root:
                self._next_iteration()
            self._forward.append(unit.index)
            how = self._gather(unit)
            if not unit.is_root:
                self.gathers["forward", how] += 1
            self._prefetch_next(self._last_forward, self._forward)
            if unit.is_root or not torch.is_grad_enabled():
                return None
            call = _Call()
            rewired = run_after_backward(lambda: self._post_backward(unit, call), args, kwargs)
            if rewired is not None:
                unit.backward_calls.add(call)
            return rewired

        return hook

    def _post_forward(self, unit: Unit):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if _in_backward():
                return None  # recompute: the unit's backward has yet to use these parameters
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
        def hook(grad: torch.Tensor) -> None:
            # Also when armed before: a unit called twice, or one with an output whose gradient
            # comes after the rest of its backward, may have been freed in between.
            how = self._gather(unit)
            if not unit.backward_armed or how != RESIDENT:
                self.gathers["backward", how] += 1
            if not unit.backward_armed:
                unit.backward_armed = True
                self._backward.append(unit.index)
                # First iteration: predict the backward order as the reverse of forward's.
                recorded = self._last_backward or [i for i in reversed(self._forward) if not self.units[i].is_root]
                self._prefetch_next(recorded, self._backward)
            return None

        return hook

    def _post_backward(self, unit: Unit, call: _Call) -> None:
        """Autograd is done with one forward call of the unit: free it after the last one."""
        unit.backward_calls.discard(call)
        if not unit.backward_calls:
            self.free(unit)

    def _next_iteration(self) -> None:
        """Free everything and keep this iteration's orders as the next one's prediction."""
        self.free_all()
        if self._forward:
            self._last_forward = self._forward
        if self._backward:
            self._last_backward = self._backward
        self._forward, self._backward = [], []

    def end_backward(self) -> None:
        """End of backward: free what is left (the root, units whose inputs needed no gradient)."""
        for unit in self.units:
            unit.backward_calls.clear()  # calls whose outputs did not reach the loss never finish
        self._next_iteration()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
