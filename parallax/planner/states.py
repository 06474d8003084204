"""Model states per rank and the step's peak, as ``parallax.zero`` lays them out.

``flat_buffers`` rebuilds the flat buffers ``px.zero.shard`` would make (the same ``_buckets``
packing for stages 0-2, the same units for stage 3, the same padding to a multiple of the world
size), so parameter, gradient and optimizer bytes are exact, padding included. ``simulate``
walks a step's trace (``trace.StepTrace``) and replays what the runtime allocates and frees at
each event on top of the live activations:

* stages 0-2 keep every parameter (b bytes each, b = 4 fp32, 2 bf16/fp16); stage 3 keeps its
  shards (b Psi / N) and gathers a unit's full buffer at the unit's forward and again at its
  backward, ``prefetch`` units ahead, freeing it after the unit's forward and after its
  backward (at the end of backward when its inputs need no gradient); the root unit stays
  gathered from the start of forward to the end of backward;
* gradients: a flat buffer's full-size gradient is allocated when the first of its gradients
  is complete and reduced when the last is (the order of reductions the ranks agree on is, in
  steady state, the order in which gradients arrive); stage 0 all-reduces it in place and keeps it until ``zero_grad``; stage 1 keeps
  it for good (ZeRO-1 shards only the optimizer state) and reduce-scatters in place; stages 2-3
  reduce-scatter into a new shard (b Psi / N in all) and free the full buffer once
  ``MAX_IN_FLIGHT`` newer reductions are in flight (or at the end of backward);
* optimizer state: Adam's m and v (8 bytes per element) for fp32 parameters, fp32 master + m + v
  (12 bytes) for bf16/fp16 ones, for the elements of this rank's shard (all of them in stage
  0); with ``offload="cpu"`` it lives on the host (12 bytes per element: ``HostAdamW`` keeps an
  fp32 master even for fp32 parameters) with 4 staging slots (2 for gradients, 2 for updated
  parameters) of the largest buffer's shard.

The step's peak is the largest (live activation bytes + model states) over the timeline,
including the optimizer step (model states + gradients after backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallax.planner.trace import (
    BACKWARD,
    BWD_POST,
    BWD_PRE,
    END,
    FWD_POST,
    FWD_PRE,
    GRAD,
    ParamSpec,
    StepTrace,
)
from parallax.zero.grads import MAX_IN_FLIGHT
from parallax.zero.layout import FlatLayout
from parallax.zero.module import _buckets

__all__ = ["Buffer", "StateBytes", "Peak", "flat_buffers", "state_bytes", "simulate", "optimizer_bytes_per_element"]

HOST_STAGING_SLOTS = 4  # HostAdamW: 2 gradient slots + 2 parameter slots of the largest shard


def optimizer_bytes_per_element(element_size: int, offload: str) -> int:
    """Adam state bytes per trained element: m, v (+ fp32 master for low precision or offload)."""
    return 12 if (element_size < 4 or offload == "cpu") else 8


@dataclass(eq=False)
class Buffer:
    """One flat buffer: parameter indices (``trace.params`` order) and their layout."""

    params: list[int]
    layout: FlatLayout
    trainable: int  # number of trainable parameters in it
    unit: int = -1  # stage 3: the unit it belongs to

    def full_bytes(self, b: int) -> int:
        return self.layout.padded_numel * b

    def shard_bytes(self, b: int) -> int:
        return self.layout.shard_numel * b

    def trained_elements(self, rank: int, trainable: set[str]) -> int:
        """Trainable elements in ``rank``'s shard (what the optimizer keeps state for)."""
        return sum(s.numel for s in self.layout.segments(rank) if s.name in trainable)


def flat_buffers(params: list[ParamSpec], units: list[list[int]], stage: int, world: int, bucket_mb: float,
                 dtype: torch.dtype) -> list[Buffer]:
    """The flat buffers ``px.zero.shard(stage, bucket_mb)`` builds for these parameters in ``dtype``."""
    shard_world = world if stage > 0 else 1
    if stage == 3:
        out = []
        for u, members in enumerate(units):
            if members:
                layout = FlatLayout([(params[i].name, params[i].shape, params[i].requires_grad) for i in members],
                                    shard_world)
                out.append(Buffer(list(members), layout, sum(params[i].requires_grad for i in members), u))
        return out
    index = {p.name: i for i, p in enumerate(params)}
    named = [(p.name, torch.empty(p.shape, dtype=dtype, device="meta")) for p in params if p.requires_grad]
    out = []
    for members in _buckets(named, bucket_mb):
        idx = [index[name] for name, _ in members]
        layout = FlatLayout([(params[i].name, params[i].shape, True) for i in idx], shard_world)
        out.append(Buffer(idx, layout, len(idx)))
    return out


@dataclass(frozen=True)
class StateBytes:
    """What a rank holds between steps (after ``zero_grad``), in bytes; the worst rank's."""

    params: int  # parameters resident on the device (stage 3: shards only)
    grads: int  # gradients kept between steps (stage 1's full buffer; else 0)
    optimizer: int  # optimizer state on the device
    host: int  # optimizer state + staging on the host (offload)
    grads_after_backward: int  # gradients held after backward, before the optimizer step

    @property
    def device(self) -> int:
        return self.params + self.grads + self.optimizer


def state_bytes(params: list[ParamSpec], buffers: list[Buffer], stage: int, world: int, element_size: int,
                offload: str) -> StateBytes:
    """Model-state bytes of the worst rank (padding lands on the last ranks' shards)."""
    b = element_size
    trainable = {p.name for p in params if p.requires_grad}
    in_buffers = {i for buf in buffers for i in buf.params}
    loose = sum(p.numel * b for i, p in enumerate(params) if i not in in_buffers)  # frozen params, stages 0-2
    if stage == 3:
        param_bytes = sum(buf.shard_bytes(b) for buf in buffers) + loose
    else:
        param_bytes = sum(buf.full_bytes(b) for buf in buffers) + loose
    grad_buffers = [buf for buf in buffers if buf.trainable]
    kept = sum(buf.full_bytes(b) for buf in grad_buffers) if stage == 1 else 0
    if stage in (0, 1):
        after_backward = sum(buf.full_bytes(b) for buf in grad_buffers)
    else:
        after_backward = sum(buf.shard_bytes(b) for buf in grad_buffers)
    per_element = optimizer_bytes_per_element(b, offload)
    ranks = range(world) if stage > 0 else range(1)
    worst_opt, worst_host = 0, 0
    for r in _ranks_to_check(ranks):
        elements = [buf.trained_elements(r if stage > 0 else 0, trainable) for buf in grad_buffers]
        state = per_element * sum(elements)
        if offload == "cpu":
            worst_host = max(worst_host, state + HOST_STAGING_SLOTS * b * max(elements, default=0))
        else:
            worst_opt = max(worst_opt, state)
    return StateBytes(param_bytes, kept, worst_opt, worst_host, after_backward)


def _ranks_to_check(ranks: range) -> list[int]:
    # Shards differ only through padding, which sits at the end of each buffer: the first and
    # the last two ranks cover every case without walking thousands of ranks.
    n = len(ranks)
    return sorted({0, max(0, n - 2), n - 1}) if n > 3 else list(ranks)


BACKENDS = ("nccl", "gloo")


@dataclass
class Peak:
    """The step's highest point: total bytes, its parts, and where it happened."""

    total: int = 0
    activations: int = 0  # live activation bytes (trace) at the peak
    params: int = 0  # parameters resident at the peak (stage 3: shards + gathered units)
    grads: int = 0  # gradients: full-size buffers being filled or reduced, reduced shards
    optimizer: int = 0  # optimizer state on the device
    comm: int = 0  # communication copies (gloo: a reduce-scatter's copy of its input, all-gather staging)
    phase: str = "forward"  # forward, backward or step


class _Replay:
    """What the ZeRO runtime holds at each point of a trace (see the module docstring)."""

    def __init__(self, trace: StepTrace, buffers: list[Buffer], states: StateBytes, stage: int,
                 element_size: int, prefetch: int, world_size: int, backend: str) -> None:
        self.trace, self.buffers, self.states, self.stage = trace, buffers, states, stage
        self.b, self.prefetch, self.gloo = element_size, prefetch, backend == "gloo"
        self.waits_for_peers = world_size > 1
        self.buffer_of = {i: buf for buf in buffers if buf.trainable for i in buf.params
                          if trace.params[i].requires_grad}
        self.unit_bytes: dict[int, int] = {}
        if stage == 3:
            for buf in buffers:
                self.unit_bytes[buf.unit] = self.unit_bytes.get(buf.unit, 0) + buf.full_bytes(self.b)
        self.order = {FWD_PRE: [a for _, k, a in trace.timeline if k == FWD_PRE],
                      BWD_PRE: [a for _, k, a in trace.timeline if k == BWD_PRE]}
        self.gathered: set[int] = set()  # stage-3 units whose full buffers exist
        self.full_grads: set[int] = set()  # id(buffer) with a full-size gradient buffer
        self.copies: dict[int, int] = {}  # id(buffer) -> bytes a gloo reduce-scatter in flight holds
        self.staging: dict[int, int] = {}  # unit -> bytes a gloo all-gather in flight (a prefetch) stages
        self.transient = 0  # a communication buffer that exists only for the current sample
        self.shard_grads = 0
        self.written: dict[int, int] = {}
        self.launched: set[int] = set()
        self.in_flight: list[Buffer] = []
        self.phase = "forward"
        self.peak = Peak()

    # ------------------------------------------------------------------ accounting

    def consider(self, live: int) -> None:
        b, states = self.b, self.states
        params = states.params + sum(self.unit_bytes.get(u, 0) for u in self.gathered)
        grads = states.grads + self.shard_grads + sum(buf.full_bytes(b) for buf in self.buffers
                                                      if id(buf) in self.full_grads)
        comm = sum(self.copies.values()) + sum(self.staging.values()) + self.transient
        total = live + params + grads + states.optimizer + comm
        if total > self.peak.total:
            p = self.peak
            p.total, p.activations, p.params, p.grads, p.comm = total, live, params, grads, comm
            p.optimizer, p.phase = states.optimizer, self.phase

    # ------------------------------------------------------------------ stage 3 units

    def gather(self, u: int, order: list[int], live: int) -> None:
        """``UnitGatherer``: gather ``u`` (waiting for its prefetch), then prefetch what follows."""
        self.staging.pop(u, None)  # a prefetch is waited for here
        if u not in self.gathered:
            self.allocate_unit(u, live, prefetch=False)
        if u in order:
            pos = order.index(u)
            for nxt in order[pos + 1: pos + 1 + self.prefetch]:
                if nxt not in self.gathered:
                    self.allocate_unit(nxt, live, prefetch=True)

    def allocate_unit(self, u: int, live: int, prefetch: bool) -> None:
        # The full buffer is allocated when its all-gather is issued. gloo copies the input while
        # issuing (freed before the call returns), then its worker thread stages the gathered
        # data in a full-size buffer until the collective completes: with other ranks to wait
        # for, a prefetch may hold it until it is waited for (counted so: an upper bound).
        self.gathered.add(u)
        if self.gloo:
            self.transient = self.unit_bytes.get(u, 0)
            self.consider(live)
            self.transient = 0
            if prefetch and self.waits_for_peers:
                self.staging[u] = self.unit_bytes.get(u, 0)

    def free_unit(self, u: int) -> None:
        self.gathered.discard(u)
        self.staging.pop(u, None)

    # ------------------------------------------------------------------ gradients

    def gradient(self, i: int, live: int, live_after: int) -> None:
        """``GradientReducer``'s hook for parameter ``i``: copy into the flat buffer, maybe reduce."""
        buf = self.buffer_of.get(i)
        if buf is None:
            self.consider(live)
            return
        if self.stage != 1:  # stage 1's full gradient buffer is kept between steps
            self.full_grads.add(id(buf))
        self.consider(live)  # p.grad and the flat buffer it is copied into
        self.written[id(buf)] = self.written.get(id(buf), 0) + 1
        if self.written[id(buf)] == buf.trainable:
            self.launch(buf, live_after)  # p.grad was dropped first

    def launch(self, buf: Buffer, live: int) -> None:
        self.launched.add(id(buf))
        if self.stage > 0:
            if self.stage > 1:
                self.shard_grads += buf.shard_bytes(self.b)  # the reduce-scatter's output becomes the shard
            if self.gloo:  # gloo reduce-scatters a copy of the input, alive until the work is waited
                self.copies[id(buf)] = buf.full_bytes(self.b)
        self.in_flight.append(buf)
        self.consider(live)
        while len(self.in_flight) > MAX_IN_FLIGHT:
            self.finish(self.in_flight[0])

    def finish(self, buf: Buffer) -> None:
        self.in_flight.remove(buf)
        self.copies.pop(id(buf), None)
        if self.stage in (2, 3):  # stage 0: the full buffer is the reduced gradient; stage 1 keeps it
            self.full_grads.discard(id(buf))

    # ------------------------------------------------------------------ the walk

    def run(self) -> Peak:
        items = self.trace.timeline
        for k, (live, kind, arg) in enumerate(items):
            if kind is None:
                self.consider(live)
            elif kind in (FWD_PRE, BWD_PRE):
                if self.stage == 3:
                    self.gather(arg, self.order[kind], live)
                self.consider(live)
            elif kind in (FWD_POST, BWD_POST):
                self.consider(live)
                if self.stage == 3 and arg != 0:
                    self.free_unit(arg)
            elif kind == BACKWARD:
                self.phase = "backward"
                self.consider(live)
            elif kind == GRAD:
                after = items[k + 1][0] if k + 1 < len(items) else live
                self.gradient(arg, live, after)
            elif kind == END:
                for buf in self.buffers:  # every buffer is reduced once; those with unused parameters now
                    if buf.trainable and id(buf) not in self.launched:
                        self.launch(buf, live)
                while self.in_flight:
                    self.finish(self.in_flight[0])
                self.gathered.clear()
                self.consider(live)
        # The optimizer step: model states and the gradients backward left; stages 1-2 then
        # all-gather the updated parameters, every buffer issued before the first is waited for
        # (gloo: the issuing thread's copy of one buffer and the staging of the two its worker
        # threads run at once: the three largest).
        self.phase = "step"
        self.staging.clear()
        if self.gloo and self.stage in (1, 2):
            self.transient = sum(sorted((buf.full_bytes(self.b) for buf in self.buffers), reverse=True)[:3])
        self.consider(0)
        self.transient = 0
        return self.peak


def simulate(trace: StepTrace, buffers: list[Buffer], states: StateBytes, stage: int, element_size: int,
             prefetch: int, *, world_size: int = 1, backend: str = "nccl") -> Peak:
    """Replay the runtime's allocations along ``trace``; the peak device bytes of one steady-state step.

    ``backend``: "nccl" (collectives work in the given buffers) or "gloo" (a reduce-scatter in
    flight holds a copy of its full-size input; an all-gather copies its input while being
    issued and stages its full-size output while it runs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return _Replay(trace, buffers, states, stage, element_size, prefetch, world_size, backend).run()
