"""``ZeroOptimizer``: any element-wise ``torch.optim.Optimizer`` run on this rank's shards only.

Each flat buffer's shard is cut at parameter-group boundaries into *runs*; every run is one
tensor (a view of the shard, with a view of the reduced gradient shard as ``.grad``) handed to
the wrapped optimizer, so optimizer state exists only for this rank's elements. Element-wise
optimizers (AdamW, Adam, SGD, ...) then give exactly the unsharded result. After the step,
stages 1-2 all-gather the updated shards into every rank's full parameters; stage 3 keeps
only the shards (the next forward gathers them).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallax.offload import HostAdamW
from parallax.optim import AdamW
from parallax.zero.flat import FlatBuffer
from parallax.zero.layout import Segment
from parallax.zero.module import zero_state

__all__ = ["Run", "ZeroOptimizer"]

FORMAT = "parallax.zero/1"
OFFLOAD = ("none", "cpu")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Run:
    """Contiguous elements ``[lo, hi)`` of a buffer's shard that belong to one param group."""

    buffer: FlatBuffer
    group: int
    lo: int
    hi: int
    segments: list[Segment]  # the parameter pieces it covers; shard_offset is relative to the run
    param: nn.Parameter  # view of buffer.shard[lo:hi], what the wrapped optimizer updates

    def grad(self) -> torch.Tensor | None:
        g = self.buffer.grad_shard
        return None if g is None else g[self.lo: self.hi]


def _runs(buffers: list[FlatBuffer], group_of: dict[str, int]) -> list[Run]:
    runs: list[Run] = []
    for buffer in buffers:
        trainable = {s.name for s, t in zip(buffer.layout.slots, buffer.trainable) if t}
        current: list[Segment] = []
        for seg in buffer.layout.segments(buffer.rank):
            if seg.name not in trainable or seg.name not in group_of:
                continue
            if current and (group_of[current[0].name] != group_of[seg.name]
                            or current[-1].shard_offset + current[-1].numel != seg.shard_offset):
                runs.append(_make_run(buffer, group_of, current))
                current = []
            current.append(seg)
        if current:
            runs.append(_make_run(buffer, group_of, current))
    return runs


def _make_run(buffer: FlatBuffer, group_of: dict[str, int], segments: list[Segment]) -> Run:
    lo = segments[0].shard_offset
    hi = segments[-1].shard_offset + segments[-1].numel
    rel = [Segment(s.name, s.start, s.end, s.shard_offset - lo) for s in segments]
    return Run(buffer, group_of[segments[0].name], lo, hi, rel, nn.Parameter(buffer.shard[lo:hi]))


class ZeroOptimizer(torch.optim.Optimizer):
    """Shards the optimizer of a model prepared by ``px.zero.shard``.

    ``param_groups`` lists groups of the *model's* parameters with their options (as for any
    torch optimizer); default: one group of every trainable parameter. ``defaults`` are the
    wrapped optimizer's keyword arguments. Works with ``torch.optim.lr_scheduler``. Gradients
    live in the shards, not in ``p.grad``: clip with ``clip_grad_norm_`` here.

    ``offload="cpu"`` keeps the fp32 master shard and the moments in pinned host memory and
    steps them with the C++ CPU AdamW (``parallax.offload.HostAdamW``; stages 1-3, AdamW only).

    ``loss_scaler`` (a ``px.amp.LossScaler``; ``px.initialize`` adds one for fp16) makes
    ``backward`` scale the loss and ``step`` unscale the gradient shards with the fused kernel,
    skip the step on every rank when any rank saw inf/NaN, and update the scale.
    """

    def __init__(self, model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = AdamW, *,
                 stage: int | None = None, param_groups: Iterable[dict[str, Any]] | None = None,
                 offload: str = "none", loss_scaler: Any = None, **defaults: Any) -> None:
        zs = zero_state(model)
        if stage is not None and stage != zs.stage:
            raise ValueError(f"stage={stage} but the model was sharded with stage {zs.stage}")
        self.model = model
        self.zero = zs
        names = {id(p): n for n, p in model.named_parameters()}
        groups = list(param_groups) if param_groups is not None else [
            {"params": [p for p in model.parameters() if p.requires_grad]}]
        group_of: dict[str, int] = {}
        for gi, group in enumerate(groups):
            params = group["params"]
            for p in [params] if isinstance(params, torch.Tensor) else params:
                if id(p) not in names:
                    raise ValueError(f"param_groups[{gi}] holds a tensor that is not a parameter of the model")
                if names[id(p)] in group_of:
                    raise ValueError(f"parameter {names[id(p)]} appears in more than one param group")
                group_of[names[id(p)]] = gi
        self.runs = _runs(zs.buffers, group_of)
        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
        if offload == "cpu":
            if zs.stage == 0:
                raise ValueError("offload='cpu' needs ZeRO stage 1, 2 or 3 (stage 0 replicates the optimizer "
                                 "state on every rank; stage 1 has the same communication and shards it)")
            if optimizer_cls is not AdamW:
                raise ValueError(f"offload='cpu' runs parallax's C++ CPU AdamW; optimizer_cls must be "
                                 f"parallax.optim.AdamW, got {optimizer_cls.__name__}")
        elif any(r.param.dtype in _LOW_PRECISION for r in self.runs):
            # bf16/fp16 parameters: fp32 master weights and moments for this rank's shard, and the
            # low-precision shard written in the same pass (parallax.optim.AdamW's master mode).
            if "master_weights" not in inspect.signature(optimizer_cls).parameters:
                raise ValueError(f"{optimizer_cls.__name__} keeps no fp32 master weights for bf16/fp16 parameters; "
                                 "use parallax.optim.AdamW (master_weights=True) or fp32 parameters")
            defaults.setdefault("master_weights", True)
        shard_groups = [{**{k: v for k, v in g.items() if k != "params"},
                         "params": [r.param for r in self.runs if r.group == gi]} for gi, g in enumerate(groups)]
        super().__init__(shard_groups, defaults)
        # The wrapped optimizer shares our param-group dicts (an lr scheduler on this object
        # reaches it) and its state is ours.
        if offload == "cpu":
            buckets = [[r.param for r in self.runs if r.buffer is b] for b in zs.buffers]
            self.inner = HostAdamW(self.param_groups, buckets, **defaults)
        else:
            self.inner = optimizer_cls(self.param_groups, **defaults)
        self.offload = offload
        self.loss_scaler = loss_scaler
        self._unscaled = False  # this iteration's gradients were already unscaled (by clipping)
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update this rank's shards; stages 1-2 then all-gather the full parameters.

        With a loss scaler, a step whose gradients hold inf/NaN on any rank is skipped on all.
        """
        if self.loss_scaler is not None:
            skip = self.loss_scaler.should_skip_step(self)
            self.loss_scaler.update()
            self._unscaled = False
            if skip:
                return None
        for run in self.runs:
            run.param.grad = run.grad()
        loss = self.inner.step(closure)
        if self.zero.stage in (1, 2):
            pending = [self.zero.comm.all_gather(b.full, b.shard, what=f"all_gather of updated flat buffer {b.index}")
                       for b in self.zero.buffers]
            for p in pending:
                p.wait()
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (scaled when there is a loss scaler); gradients are reduced into the
        shards as backward runs."""
        (self.loss_scaler.scale(loss) if self.loss_scaler is not None else loss).backward()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero.reducer.zero_grad()
        for run in self.runs:
            run.param.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip like ``torch.nn.utils.clip_grad_norm_`` on the unsharded gradients; returns the total norm."""
        if self.loss_scaler is not None and not self._unscaled:
            self.loss_scaler.unscale_(self)  # clip the true gradients (GradScaler's rule)
            self._unscaled = True
        grads = [b.grad_shard for b in self.zero.buffers if b.grad_shard is not None]
        device = self.zero.buffers[0].device if self.zero.buffers else torch.device("cpu")
        inf = math.isinf(norm_type)
        if inf:
            local = torch.stack([g.abs().max().float() for g in grads]).max() if grads else torch.zeros((), device=device)
        else:
            local = sum((g.float().pow(norm_type).sum() for g in grads), torch.zeros((), device=device))
        if self.zero.stage > 0 and self.zero.comm.world_size > 1:
            op = torch.distributed.ReduceOp.MAX if inf else torch.distributed.ReduceOp.SUM
            self.zero.comm.all_reduce(local, "all_reduce of the gradient norm", op).wait()
        total = local if inf else local.pow(1.0 / norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    # ---------------------------------------------------------------- for loss scaling

    def grad_shards(self) -> list[torch.Tensor]:
        """This rank's reduced gradients: one flat tensor per flat buffer that has them."""
        return [b.grad_shard for b in self.zero.buffers if b.grad_shard is not None]

    def all_reduce_found_inf(self, found_inf: torch.Tensor) -> None:
        """``found_inf`` (one element) becomes its maximum over all ranks, in place."""
        if self.zero.comm.world_size > 1 and self.zero.stage > 0:
            flag = found_inf.detach().reshape(1).float().to(self.zero.comm.device)
            self.zero.comm.all_reduce(flag, "all_reduce of the non-finite gradient flag",
                                      torch.distributed.ReduceOp.MAX).wait()
            found_inf.copy_(flag.reshape(found_inf.shape))

    def nonfinite_parameters(self) -> list[str]:
        """Names of the parameters whose gradient holds inf or NaN on any rank (sorted)."""
        names = set()
        for buffer in self.zero.buffers:
            if buffer.grad_shard is None:
                continue
            for seg in buffer.layout.segments(buffer.rank):
                piece = buffer.grad_shard[seg.shard_offset: seg.shard_offset + seg.numel]
                if not torch.isfinite(piece).all():
                    names.add(seg.name)
        if self.zero.comm.world_size > 1 and self.zero.stage > 0:
            everyone: list = [None] * self.zero.comm.world_size
            torch.distributed.all_gather_object(everyone, sorted(names), group=self.zero.comm.group)
            names = set().union(*everyone)
        return sorted(names)

    # ---------------------------------------------------------------- state

    def layout_key(self) -> list[tuple]:
        return [(r.buffer.index, r.group, r.lo, r.hi) for r in self.runs]

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer state (load it back with the same world size and
        stage; ``px.checkpoint`` saves and reshards across world sizes and stages)."""
        return {"format": FORMAT, "stage": self.zero.stage, "world_size": self.zero.comm.world_size,
                "rank": self.zero.comm.rank, "layout": self.layout_key(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != FORMAT:
            raise ValueError("not a ZeroOptimizer state dict (use px.checkpoint.load for checkpoints)")
        mine = (self.zero.stage, self.zero.comm.world_size, self.zero.comm.rank, self.layout_key())
        theirs = (state_dict["stage"], state_dict["world_size"], state_dict["rank"],
                  [tuple(k) for k in state_dict["layout"]])
        if mine != theirs:
            raise ValueError(f"this state was saved by rank {theirs[2]} of {theirs[1]} at stage {theirs[0]} with another "
                             f"shard layout; px.checkpoint.save/load reshard between world sizes and stages")
        self.load_inner_state_dict(state_dict["inner"])

    def load_inner_state_dict(self, inner_state_dict: dict[str, Any]) -> None:
        """Load a state dict of the wrapped optimizer (its params numbered like ours)."""
        self.inner.load_state_dict(inner_state_dict)
        # torch's load_state_dict replaces the param-group dicts: share the new ones again, or
        # an lr scheduler (or a loop setting group["lr"]) would no longer reach the optimizer.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
