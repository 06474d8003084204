"""``ZeroOptimizer``: any element-wise ``torch.optim.Optimizer`` run on this rank's shards only.

Each flat buffer's shard is cut into *runs*, one per parameter piece; every run is one tensor
(a view of the shard, with a view of the reduced gradient shard as ``.grad``, or None for a
parameter no rank used) handed to the wrapped optimizer, so optimizer state exists only for
this rank's elements. Element-wise optimizers (AdamW, Adam, SGD, ...) then give exactly the
unsharded result. After the step, stages 1-2 all-gather the updated shards into every rank's
full parameters; stage 3 keeps only the shards (the next forward gathers them).
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
from parallax.zero.comm import Comm
from parallax.zero.flat import FlatBuffer
from parallax.zero.layout import Segment
from parallax.zero.module import zero_state

__all__ = ["Run", "ZeroOptimizer"]

FORMAT = "parallax.zero/1"
OFFLOAD = ("none", "cpu")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Run:
    """One parameter's elements in this rank's shard: ``buffer.shard[lo:hi]``, in param group ``group``.

    One run per parameter piece, so that the wrapped optimizer sees a parameter that no rank used
    since ``zero_grad`` as one whose ``.grad`` is None and skips it exactly as torch does (no
    momentum, moment, step-count or weight-decay update), whatever the optimizer. Runs covering
    several parameters would share one state entry, and Adam's step count, between them.
    """

    buffer: FlatBuffer
    group: int
    slot: int  # the parameter's index in buffer.params
    segment: Segment  # its piece; shard_offset is relative to this rank's shard
    param: nn.Parameter  # view of buffer.shard[lo:hi], what the wrapped optimizer updates

    @property
    def lo(self) -> int:
        return self.segment.shard_offset

    @property
    def hi(self) -> int:
        return self.segment.shard_offset + self.segment.numel

    def grad(self) -> torch.Tensor | None:
        """The reduced gradient of this piece; None when no rank used the parameter (call
        ``reducer.settle()`` first)."""
        g = self.buffer.grad_shard
        return None if g is None or not self.buffer.has_grad[self.slot] else g[self.lo: self.hi]


def _runs(buffers: list[FlatBuffer], group_of: dict[str, int]) -> list[Run]:
    runs: list[Run] = []
    for buffer in buffers:
        slot_of = {s.name: i for i, s in enumerate(buffer.layout.slots)}
        for seg in buffer.layout.segments(buffer.rank):
            i = slot_of[seg.name]
            if buffer.trainable[i] and seg.name in group_of:
                view = buffer.shard[seg.shard_offset: seg.shard_offset + seg.numel]
                runs.append(Run(buffer, group_of[seg.name], i, seg, nn.Parameter(view)))
    return runs


class ZeroOptimizer(torch.optim.Optimizer):
    """Shards the optimizer of a model prepared by ``px.zero.shard``.

    ``param_groups`` lists groups of the *model's* parameters with their options (as for any
    torch optimizer); default: one group of every trainable parameter. ``defaults`` are the
    wrapped optimizer's keyword arguments. Works with ``torch.optim.lr_scheduler``. Gradients
    live in the shards, not in ``p.grad``: clip with ``clip_grad_norm_`` here, read them with
    ``px.zero.full_grads``. A parameter that no rank used since ``zero_grad`` has no gradient
    and is not stepped (as in torch, and DDP with ``find_unused_parameters=True``).

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
        self.zero.reducer.settle()
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
        """Drop the gradients. ``set_to_none=False`` keeps a zero gradient for each parameter that
        had one (torch's rule): such a parameter is stepped even if no rank uses it next time."""
        self.zero.reducer.zero_grad(keep_has_grad=not set_to_none)
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
        parallel = self._parallel_state()
        if parallel is not None:
            local = self._weighted_local_norm(parallel, norm_type, device)
        elif inf:
            local = torch.stack([g.abs().max().float() for g in grads]).max() if grads else torch.zeros((), device=device)
        else:
            local = sum((g.float().pow(norm_type).sum() for g in grads), torch.zeros((), device=device))
        op = torch.distributed.ReduceOp.MAX if inf else torch.distributed.ReduceOp.SUM
        if self.zero.stage > 0 and self.zero.comm.world_size > 1:
            self.zero.comm.all_reduce(local, "all_reduce of the gradient norm", op).wait()
        for group in self._model_parallel_groups():
            self._reduce_over(group, local, "all_reduce of the gradient norm over a model-parallel group", op)
        total = local if inf else local.pow(1.0 / norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    # ---------------------------------------------------------------- tensor / pipeline parallelism

    def _parallel_state(self):
        """The model's ``parallax.parallel`` state (tensor/pipeline placement), or None."""
        return getattr(self.model, "_parallax_parallel", None)

    def _model_parallel_groups(self) -> list:
        state = self._parallel_state()
        return [] if state is None else state.norm_groups

    def _reduce_over(self, group, value: torch.Tensor, what: str, op) -> None:
        """All-reduce ``value`` in place over another mesh dimension's ``group``, on its backend's device."""
        moved = value.detach().reshape(1).float().to(self.zero.comm.device)
        Comm(group, self.zero.comm.timeout_s).all_reduce(moved, what, op).wait()
        value.copy_(moved.reshape(value.shape))

    def _weighted_local_norm(self, parallel, norm_type: float, device: torch.device) -> torch.Tensor:
        """This rank's share of the global gradient norm (sum of |g|^p, or max for inf) with each
        parameter weighted by ``parallel.norm_weight`` so that every element over the mesh counts once."""
        inf = math.isinf(norm_type)
        self.zero.reducer.settle()  # which parameters got a gradient on some rank
        local = torch.zeros((), device=device)
        for run in self.runs:
            grad = run.grad()
            weight = parallel.norm_weight(run.segment.name)
            if grad is None or weight == 0.0 or grad.numel() == 0:
                continue
            if inf:
                local = torch.maximum(local, grad.abs().max().float())
            else:
                local = local + weight * grad.float().pow(norm_type).sum()
        return local

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
        for group in self._model_parallel_groups():
            self._reduce_over(group, found_inf, "all_reduce of the non-finite gradient flag over a model-parallel "
                              "group", torch.distributed.ReduceOp.MAX)

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
