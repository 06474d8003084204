"""Activation checkpointing: keep only each repeated block's input, recompute the block in backward.

    model = px.checkpoint.activation(model)                      # every block
    model = px.checkpoint.activation(model, policy="every_n:2")  # blocks 0, 2, 4, ...
    model = px.checkpoint.activation(model, offload=True)        # block inputs saved in (pinned) CPU memory

A plain forward keeps every intermediate that backward needs (for a GPT block: the LayerNorm
outputs and statistics, q/k/v, the attention output and its softmax statistics, the 4C-wide MLP
activation, dropout masks, ...). A checkpointed block keeps only its input, x (B, T, C), and
runs its forward a second time during backward to rebuild the rest. This is
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, applied in place: the selected
blocks' ``forward`` is replaced by a wrapper (an instance attribute), so the module tree,
parameter names, ``state_dict`` keys and module hooks are unchanged.

``saved_activations(fn)`` measures what a forward leaves for backward, by intercepting every
saved tensor with ``torch.autograd.graph.saved_tensors_hooks``.

Note: ``parallax.checkpoint.activation`` is this function (the package re-exports it under the
module's name); import the module's other names with
``from parallax.checkpoint.activation import saved_activations``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallax.zero.module import default_units

__all__ = [
    "POLICIES",
    "Policy",
    "SavedActivations",
    "activation",
    "checkpointed_blocks",
    "is_recomputing",
    "saved_activation_bytes",
    "saved_activations",
    "select_blocks",
]

log = logging.getLogger(__name__)

# What `policy` accepts, for error messages.
POLICIES = ('"block" (every repeated block)', '"every_n:K" (blocks 0, K, 2K, ...; K >= 1)',
            "a callable (index, module) -> bool")
Policy = str | Callable[[int, nn.Module], bool]

_local = threading.local()  # recompute depth of this thread (backward runs recomputes on its own threads)


def is_recomputing() -> bool:
    """True while a checkpointed block's forward is being re-run during backward (in this thread).

    Forward pre/post hooks of the checkpointed block itself do not fire during the recompute
    (the wrapper calls the block's original ``forward`` directly), but hooks of its submodules
    do; they can call this to tell the recompute from the real forward.
    """
    return getattr(_local, "depth", 0) > 0


class _CheckpointedForward:
    """Replaces a block's ``forward``: runs the original under non-reentrant checkpointing.

    A small class rather than a closure so that ``copy.deepcopy(model)`` copies it along with
    the block (a bound method deep-copies onto the copied block; a closure would keep calling
    the original block).
    """

    def __init__(self, forward: Callable[..., Any], offload: bool) -> None:
        self.forward = forward  # the block's forward before wrapping (a bound method)
        self.offload = offload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Without autograd nothing is saved, so there is nothing to save memory on.
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        # Keyword arguments travel as positional ones: checkpoint saves positional tensor
        # arguments through the saved-tensor hooks (so they are counted and offloaded) and its
        # own keywords (use_reentrant, preserve_rng_state, ...) cannot clash with the block's.
        names = tuple(kwargs)
        num_args = len(args)
        calls = 0

        def run(*flat: Any) -> Any:
            nonlocal calls
            calls += 1
            recompute = calls > 1  # the first call is the real forward, later ones are in backward
            _local.depth = getattr(_local, "depth", 0) + recompute
            try:
                return self.forward(*flat[:num_args], **dict(zip(names, flat[num_args:])))
            finally:
                _local.depth -= recompute

        flat = (*args, *kwargs.values())
        if self.offload:
            # Only the block's inputs reach these hooks (checkpoint's own hooks take the tensors
            # saved inside the block). Pinned host memory makes the device-to-host copy
            # asynchronous; pinning needs CUDA, and CPU tensors are kept as they are
            # (save_on_cpu without pinning does tensor.cpu(), a no-op for them).
            pin = torch.cuda.is_available() and any(isinstance(t, torch.Tensor) and t.is_cuda for t in flat)
            hooks = torch.autograd.graph.save_on_cpu(pin_memory=pin)
        else:
            hooks = contextlib.nullcontext()
        with hooks:
            # preserve_rng_state: the recompute draws the same dropout masks as the forward did.
            return checkpoint(run, *flat, use_reentrant=False, preserve_rng_state=True)


def _parse_policy(policy: Policy) -> Callable[[int, nn.Module], bool]:
    allowed = "; allowed: " + ", ".join(POLICIES)
    if callable(policy):
        return policy
    if not isinstance(policy, str):
        raise ValueError(f"activation checkpointing policy {policy!r} is neither a string nor callable{allowed}")
    if policy == "block":
        return lambda index, module: True
    if policy.startswith("every_n:"):
        text = policy[len("every_n:"):]
        k = int(text) if text.strip().isdigit() else 0
        if k < 1:
            raise ValueError(f"activation checkpointing policy {policy!r}: K must be an integer >= 1{allowed}")
        return lambda index, module: index % k == 0
    raise ValueError(f"unknown activation checkpointing policy {policy!r}{allowed}")


def select_blocks(model: nn.Module, policy: Policy = "block") -> list[nn.Module]:
    """The repeated blocks of ``model`` that ``policy`` selects, in registration order.

    The repeated blocks are ``parallax.zero.default_units(model)``: the members of each
    outermost ``nn.ModuleList``/``nn.Sequential`` of >= 2 modules of one class (with
    parameters). A callable policy gets each block's index in that list (0-based, counted across
    all such lists) and the block. Raises ValueError for a bad policy or a model without
    repeated blocks.
    """
    keep = _parse_policy(policy)
    blocks = default_units(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList or nn.Sequential of >= 2 modules "
            "of one class with parameters) to checkpoint; pass a callable policy (index, module) -> bool "
            "over such blocks, or wrap the layers to checkpoint in an nn.ModuleList"
        )
    return [block for index, block in enumerate(blocks) if keep(index, block)]


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` (itself included) whose forward ``activation`` wrapped."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]


def activation(model: nn.Module, policy: Policy = "block", offload: bool = False) -> nn.Module:
    """Checkpoint ``model``'s repeated blocks in place; returns the same object.

    Each selected block keeps only its inputs for backward and re-runs its forward during
    backward (``torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)``:
    gradients, dropout masks included, are those of the plain model). Blocks may be called with
    positional and keyword arguments; tensors nested inside containers are kept by reference.
    With autograd disabled (``torch.no_grad()``, inference) the blocks run plainly.

    Args:
        model: any ``nn.Module`` with repeated blocks (see ``select_blocks``), e.g. the
            reference GPT, whose blocks are ``model.transformer.h``.
        policy: ``"block"`` (every block), ``"every_n:K"`` (blocks 0, K, 2K, ...) or a callable
            ``(index, module) -> bool``.
        offload: also move the saved block inputs to CPU memory during forward and back in
            backward (``torch.autograd.graph.save_on_cpu``), pinned with asynchronous copies
            when the inputs are CUDA tensors. Gradients are unchanged. On a CPU-only machine the
            inputs already live in CPU memory and are saved as they are.

    Not idempotent: applying it to a model that has checkpointed blocks raises ValueError.
    Parameter names, ``named_parameters()``, ``state_dict()`` and the module tree are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"activation checkpointing needs an nn.Module, got {type(model).__name__}")
    already = checkpointed_blocks(model)
    if already:
        raise ValueError(
            f"activation checkpointing is already applied to {len(already)} block(s) of this "
            f"{type(model).__name__}; apply it once (with the policy you want) to a model built afresh"
        )
    blocks = select_blocks(model, policy)
    for block in blocks:
        # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up there,
        # so hooks, names and the module tree stay as they were.
        block.forward = _CheckpointedForward(block.forward, bool(offload))
    total = len(default_units(model))
    if not blocks:
        log.warning("activation checkpointing: policy %r selected none of the %d repeated blocks", policy, total)
    log.info("activation checkpointing: %d of %d repeated blocks (policy %r, offload %s)",
             len(blocks), total, policy, bool(offload))
    return model


@dataclass(frozen=True)
class SavedActivations:
    """What a forward saved for backward: distinct storages, their bytes, and the forward's output."""

    nbytes: int  # total bytes of the distinct storages saved (each storage counted once)
    count: int  # number of distinct storages saved
    tensors: int  # number of saved tensors (with repeats: a tensor saved by two ops counts twice)
    output: Any  # what fn returned (its autograd graph is alive: backward still works)


def _is_parameter_like(t: torch.Tensor) -> bool:
    # Autograd hands the hooks a fresh Tensor object, never the Parameter itself, and Linear
    # saves a transposed view of its weight: a leaf that requires grad, or a view of one, is a
    # parameter (or a caller's input), memory that exists whether or not anything is saved.
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


def saved_activations(fn: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()) -> SavedActivations:
    """Run ``fn()`` (a forward) and measure the tensors autograd saves for its backward.

    Every tensor saved for backward passes through ``torch.autograd.graph.saved_tensors_hooks``.
    Storages are counted once each, at their full size (a saved view keeps its whole storage
    alive). Parameters and other leaf tensors that require grad (and views of them) are left
    out: they are saved by reference and exist anyway; ``exclude`` names more tensors whose
    storages to leave out. Tensors that an inner hook takes first are not seen: those saved
    inside a checkpointed block (checkpoint keeps only its inputs) and, under ``offload=True``,
    the block inputs moved to CPU.
    """
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    seen: dict[tuple[torch.device, int], int] = {}
    held: list[torch.Tensor] = []  # keeps storages alive while fn runs, so no address is reused
    tensors = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal tensors
        if _is_parameter_like(t):
            return t
        try:
            storage = t.untyped_storage()
            key, nbytes = (t.device, storage.data_ptr()), storage.nbytes()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage
            key, nbytes = (t.device, id(t)), t.numel() * t.element_size()
        if key in skip:
            return t
        tensors += 1
        seen.setdefault(key, nbytes)
        held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn()
    held.clear()
    return SavedActivations(nbytes=sum(seen.values()), count=len(seen), tensors=tensors, output=output)


def saved_activation_bytes(fn: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages ``fn()`` saves for backward (see ``saved_activations``)."""
    return saved_activations(fn, exclude=exclude).nbytes
