"""Full parameters on demand, and what this rank holds in memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parallax.zero.module import zero_state

__all__ = ["full_grads", "full_state_dict", "memory_report"]


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of ``model.state_dict()`` as a full (unsharded) CPU tensor, on every rank.

    Stage-3 units are gathered one at a time, so peak memory is one unit beyond the shards.
    Tied parameters appear under each of their names, as in ``state_dict()``.
    """
    zs = zero_state(model)
    values: dict[int, torch.Tensor] = {}
    for buffer in zs.buffers:
        was_gathered = buffer.gathered
        if not was_gathered:
            buffer.gather().wait()
        for slot, p in zip(buffer.layout.slots, buffer.params):
            values[id(p)] = buffer.full[slot.offset: slot.offset + slot.numel].view(slot.shape).detach().cpu().clone()
        if not was_gathered:
            buffer.free()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = values[id(t)] if id(t) in values else t.detach().cpu().clone()
    return out


@torch.no_grad()
def full_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every trainable parameter's reduced gradient (the average over ranks, what the optimizer
    steps with) as a full CPU tensor of the parameter's shape, on every rank; None for a
    parameter without one: no rank used it since ``zero_grad``, or no synced backward ran yet.

    Every rank must call it (stages 1-3 all-gather the gradient shards, one buffer at a time).
    With a loss scaler the gradients are still scaled until ``clip_grad_norm_`` or ``step``
    unscales them. Tied parameters appear once, under their first name.
    """
    zs = zero_state(model)
    zs.reducer.settle()
    values: dict[int, torch.Tensor] = {}
    for buffer in zs.reducer.buffers:
        shard = buffer.grad_shard
        if shard is None:  # no reduction since zero_grad: the same on every rank
            continue
        full = shard
        if zs.stage > 0:
            full = torch.empty(buffer.layout.padded_numel, dtype=shard.dtype, device=shard.device)
            zs.comm.all_gather(full, shard, what=f"all_gather of the gradients of flat buffer {buffer.index}").wait()
        for i, (slot, p) in enumerate(zip(buffer.layout.slots, buffer.params)):
            if buffer.trainable[i] and buffer.has_grad[i]:
                values[id(p)] = full[slot.offset: slot.offset + slot.numel].view(slot.shape).cpu().clone()
    return {name: values.get(id(p)) for name, p in model.named_parameters() if p.requires_grad}


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Bytes this rank holds now: parameters (resident: full buffers in stages 0-2, shards plus
    gathered units in stage 3), gradients (local accumulation and reduced shards) and optimizer
    state; plus the model's total parameter count."""
    zs = zero_state(model)
    in_buffers = {id(p) for b in zs.buffers for p in b.params}
    params = sum(b.resident_param_bytes() for b in zs.buffers)
    params += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_buffers)
    grads = 0
    seen_grads: set[int] = set()
    for b in zs.buffers:
        for t in (b.grad_full, b.grad_shard):  # the shard may be a view of the full buffer (stage 1)
            if t is not None and t.untyped_storage().data_ptr() not in seen_grads:
                seen_grads.add(t.untyped_storage().data_ptr())
                grads += t.untyped_storage().nbytes()
    opt = 0
    if optimizer is not None:
        seen: set[int] = set()
        for state in optimizer.state.values():
            for key, v in state.items():
                if key != "step" and isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    opt += v.untyped_storage().nbytes()
    total_params = sum(p.numel() for p in model.parameters())
    return {"rank": zs.comm.rank, "world_size": zs.comm.world_size, "stage": zs.stage, "num_params": total_params,
            "param_bytes": params, "grad_bytes": grads, "optimizer_bytes": opt,
            "total_bytes": params + grads + opt}
