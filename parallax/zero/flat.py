"""``FlatBuffer``: the parameters of one bucket (stages 0-2) or one unit (stage 3), stored flat.

Every parameter becomes a view into the buffer, so ``module.named_parameters()`` keep their
names, shapes and identities. The buffer is padded to a multiple of the world size; this rank
owns the contiguous slice ``shard``. In stages 0-2 the full buffer is always resident and
``shard`` is a view into it; in stage 3 only ``shard`` is resident and the full buffer's storage
is allocated for a gather and released afterwards (saved autograd tensors keep pointing at that
same storage, which is re-filled before the unit's backward).
"""

from __future__ import annotations

import torch
from torch import nn

from parallax.zero.comm import Comm, Pending
from parallax.zero.layout import FlatLayout

__all__ = ["FlatBuffer"]


class FlatBuffer:
    def __init__(self, index: int, named_params: list[tuple[str, nn.Parameter]], comm: Comm, stage: int) -> None:
        first = named_params[0][1]
        for name, p in named_params:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"zero: parameter {name} ({p.dtype}, {p.device}) cannot share a flat buffer with "
                                 f"{named_params[0][0]} ({first.dtype}, {first.device})")
        self.index = index
        self.stage = stage
        self.comm = comm
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        # Stage 0 replicates everything: each rank "owns" the whole buffer.
        world = comm.world_size if stage > 0 else 1
        self.rank = comm.rank if stage > 0 else 0
        self.layout = FlatLayout([(n, tuple(p.shape), p.requires_grad) for n, p in named_params], world)
        self.dtype, self.device = first.dtype, first.device
        self.trainable = [slot.requires_grad for slot in self.layout.slots]
        self.num_trainable = sum(self.trainable)

        full = torch.zeros(self.layout.padded_numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for slot, p in zip(self.layout.slots, self.params):
                full[slot.offset: slot.offset + slot.numel].copy_(p.detach().reshape(-1))
        lo, hi = self.layout.shard_range(self.rank)
        self.full = full
        self.shard = full[lo:hi].clone() if stage == 3 else full[lo:hi]
        self.gathered = True
        for slot, p in zip(self.layout.slots, self.params):
            p.data = full[slot.offset: slot.offset + slot.numel].view(slot.shape)
        if stage == 3:
            self.free()

        # Gradients: local (unreduced) accumulation over the whole buffer, then this rank's
        # reduced slice. Stages 0-1 keep the full one; stages 2-3 allocate it per backward.
        self.grad_full: torch.Tensor | None = None
        self.grad_shard: torch.Tensor | None = None
        n = len(self.params)
        self.written = [False] * n  # slot holds a local gradient not reduced yet (this accumulation window)
        self.arrived = [False] * n  # slot's gradient arrived in the backward pass running now
        self.num_arrived = 0
        self.sent = [False] * n  # slot held a local gradient in a reduction of the backward running now
        self.has_grad = [False] * n  # some rank's gradient reached the slot since zero_grad (agreed by all)
        self.reduction: Pending | None = None

    # ---------------------------------------------------------------- parameters (stage 3)

    def gather(self) -> Pending:
        """Start filling the full buffer from every rank's shard (stage 3)."""
        storage = self.full.untyped_storage()
        nbytes = self.layout.padded_numel * self.full.element_size()
        if storage.size() != nbytes:
            storage.resize_(nbytes)
        self.gathered = True
        # Autograd saved views of these parameters in forward; re-filling their storage for
        # backward must not count as an in-place modification of them.
        with torch.autograd._unsafe_preserve_version_counter(self.full):
            return self.comm.all_gather(self.full, self.shard, what=f"all_gather of flat buffer {self.index}")

    def free(self) -> None:
        """Release the full buffer's memory; the parameters' views stay, pointing at empty storage."""
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    def resident_param_bytes(self) -> int:
        shard_bytes = self.shard.numel() * self.shard.element_size() if self.stage == 3 else 0
        return self.full.untyped_storage().size() + shard_bytes

    # ---------------------------------------------------------------- gradients

    def grad_view(self, i: int) -> torch.Tensor:
        """Where parameter ``i``'s gradient accumulates (allocating the buffer on first use)."""
        if self.grad_full is None:
            self.grad_full = torch.zeros(self.layout.padded_numel, dtype=self.dtype, device=self.device)
        slot = self.layout.slots[i]
        return self.grad_full[slot.offset: slot.offset + slot.numel].view(slot.shape)

    @property
    def complete(self) -> bool:
        """Every trainable parameter's gradient arrived in this backward pass."""
        return self.num_arrived == self.num_trainable
