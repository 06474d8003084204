"""``HostAdamW``: AdamW whose fp32 master weights and moments live in (pinned) host memory.

The device keeps only the parameters (low precision, or their stage-3 shards) and the gradient
shards. A step walks the flat buffers as a pipeline over two staging slots: while the C++ CPU
AdamW updates buffer i, the gradients of buffer i+1 are copied device-to-host on a side stream,
and buffer i-1's updated parameters (written by the kernel in the parameter dtype straight into
a pinned staging buffer, the "fused copy-out") travel host-to-device. The side stream first waits
for the current stream, which wrote the gradient shards; events order every copy before its use,
and the current stream waits for the parameters' arrival. Host memory: 12 bytes per shard
parameter (master, exp_avg, exp_avg_sq) plus two staging slots of the largest buffer's shard. On
a machine without a GPU the same code runs with host-to-host copies and gives the same numbers
as the device optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from parallax.ops import adamw as adamw_op

__all__ = ["HostAdamW"]

_SLOTS = 2  # staging slots: copy of buffer i+1 in flight while buffer i is updated


class HostAdamW(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW`` semantics) for device parameters, with host-resident state.

    ``buckets`` lists the parameters in pipeline order (one list per flat buffer); every
    parameter must be in exactly one bucket. State keys are ``step``, ``exp_avg``,
    ``exp_avg_sq`` and ``master_param`` (all on the host), as ``parallax.optim.AdamW``'s.
    """

    def __init__(self, params: Iterable[dict[str, Any]], buckets: list[list[nn.Parameter]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      amsgrad=False, decoupled_weight_decay=True))
        self.buckets = [b for b in buckets if b]
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if {id(p) for b in self.buckets for p in b} != known:
            raise ValueError("HostAdamW: buckets must hold exactly the optimizer's parameters")
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        first = self.buckets[0][0] if self.buckets else None
        self.device = first.device if first is not None else torch.device("cpu")
        if any(p.dtype != first.dtype for b in self.buckets for p in b):
            raise ValueError("HostAdamW: all parameters must share one dtype")
        self.pin = self.device.type == "cuda"
        for bucket in self.buckets:
            for p in bucket:
                self._init_state(p)
        largest = max((sum(p.numel() for p in b) for b in self.buckets), default=0)
        dtype = self.buckets[0][0].dtype if self.buckets else torch.float32
        self._grad_slots = [self._host(largest, dtype) for _ in range(_SLOTS)]
        self._out_slots = [self._host(largest, dtype) for _ in range(_SLOTS)]
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _host(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin)

    def _init_state(self, p: nn.Parameter) -> None:
        master = self._host(p.numel(), torch.float32)
        master.copy_(p.detach().reshape(-1))
        self.state[p] = {"step": torch.tensor(0.0), "master_param": master,
                         "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._copy_stream is not None:
            # The gradient shards were written on the current stream (reduce-scatter, clipping,
            # unscaling), maybe still running: the copies to the host must start after them.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        params_sent: list[torch.cuda.Event | None] = [None] * _SLOTS  # each out slot's last copy to the device
        grad_ready = self._copy_grads_in(0) if self.buckets else None
        for i, bucket in enumerate(self.buckets):
            slot = i % _SLOTS
            nxt = self._copy_grads_in(i + 1) if i + 1 < len(self.buckets) else None  # in flight meanwhile
            _wait(grad_ready)
            _wait(params_sent[slot])  # the slot's previous parameters have left for the device
            self._update(bucket, slot)
            params_sent[slot] = self._copy_params_out(bucket, slot)
            grad_ready = nxt
        for event in params_sent:  # the next step writes the out slots again from its first bucket
            _wait(event)
        return loss

    def _copy_grads_in(self, i: int) -> torch.cuda.Event | None:
        """Start copying bucket i's gradients into its staging slot; the event marks arrival."""
        bucket, staging = self.buckets[i], self._grad_slots[i % _SLOTS]
        with _on(self._copy_stream):
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    staging[offset: offset + p.numel()].copy_(p.grad.reshape(-1), non_blocking=True)
                offset += p.numel()
        return _record(self._copy_stream)

    def _update(self, bucket: list[nn.Parameter], slot: int) -> None:
        grads, outs = self._grad_slots[slot], self._out_slots[slot]
        by_group: dict[int, tuple[dict, list, list, list, list, list, list]] = {}
        offset = 0
        for p in bucket:
            n = p.numel()
            if p.grad is not None:
                group = self._group_of[id(p)]
                entry = by_group.setdefault(id(group), (group, [], [], [], [], [], []))
                state = self.state[p]
                if state["step"] == 0:  # the master starts from the parameter as it is at its first step
                    state["master_param"].copy_(p.detach().reshape(-1))
                state["step"] += 1
                entry[1].append(state["master_param"])
                entry[2].append(grads[offset: offset + n])
                entry[3].append(state["exp_avg"])
                entry[4].append(state["exp_avg_sq"])
                entry[5].append(outs[offset: offset + n])
                entry[6].append(float(state["step"]))
            offset += n
        for group, masters, gs, ms, vs, out, steps in by_group.values():
            beta1, beta2 = group["betas"]
            for step in sorted(set(steps)):  # parameters loaded from different steps (rare)
                pick = [k for k, s in enumerate(steps) if s == step]
                adamw_op.adamw_([masters[k] for k in pick], [gs[k] for k in pick], [ms[k] for k in pick],
                                [vs[k] for k in pick], [out[k] for k in pick], lr=float(group["lr"]),
                                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                step=step, maximize=group["maximize"])

    def _copy_params_out(self, bucket: list[nn.Parameter], slot: int) -> torch.cuda.Event | None:
        outs = self._out_slots[slot]
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with _on(self._copy_stream):
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    p.detach().reshape(-1).copy_(outs[offset: offset + p.numel()], non_blocking=True)
                offset += p.numel()
        event = _record(self._copy_stream)
        if event is not None:  # later device work on the parameters waits for the copy
            torch.cuda.current_stream(self.device).wait_event(event)
        return event

    # ---------------------------------------------------------------- state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the host tensors in place (torch's loader would move state to the device)."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"HostAdamW: the state holds {len(saved_ids)} parameters, this optimizer {len(params)}")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            state["step"] = torch.tensor(float(saved["step"]))
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].copy_(saved[key].reshape(-1))
            source = saved.get("master_param")
            state["master_param"].copy_((source if source is not None else p.detach()).reshape(-1))

    def host_bytes(self) -> int:
        """Host memory this optimizer holds: state plus staging slots."""
        tensors = [t for s in self.state.values() for t in s.values() if t.numel() > 1]
        tensors += self._grad_slots + self._out_slots
        return sum(t.numel() * t.element_size() for t in tensors)


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _wait(event) -> None:
    if event is not None:
        event.synchronize()

