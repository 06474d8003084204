"""Gradient reduction during backward: bucketed, asynchronous, overlapped with the rest of backward.

A post-accumulate-grad hook moves each parameter's gradient into its flat buffer (and drops
``p.grad``). Once every trainable parameter of a buffer has its gradient, the buffer's
reduction is issued asynchronously (all-reduce in stage 0, reduce-scatter into this rank's
slice in stages 1-3) while autograd goes on with earlier layers. A callback at the end of
backward issues what is left, waits for everything, and averages over ranks. With gradient
sync off (accumulation micro-steps) gradients only accumulate locally; the next synced
backward reduces the sum.

Parameters unused in a step (LayerDrop, mixture-of-experts routing, conditional heads) follow
DDP with ``find_unused_parameters=True``: every rank reduces every buffer in every synced
backward, a rank contributing zeros for parameters it did not use, so a parameter used on some
ranks gets the average with zeros from the others; one that no rank used since ``zero_grad``
has no gradient (``has_grad`` is False) and the optimizer skips it, as single-process torch
skips a parameter whose ``.grad`` is None.

Stage 3 interleaves these reductions with the gathers of backward, so a buffer must become
complete at the same point on every rank: a stage-3 unit's parameters must be used alike by
all ranks in a step (a whole unit may be skipped by all). Data-dependent use works in stages
0-2, and in stage 3 for parameters of the root unit, which completes last (the embedding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.autograd import Variable

from parallax.zero.comm import Comm, Pending
from parallax.zero.flat import FlatBuffer

__all__ = ["GradientReducer"]

# Reductions in flight before the oldest is waited for and its full-size gradient buffer freed.
# Waiting only at the end of backward kept every bucket's buffer alive: 4 bytes/param of
# gradients at the end of backward in stage 2 (18.6 MB vs FSDP2's 7.5 MB in `bench zero`).
# One in flight, as FSDP2: the previous bucket had a whole bucket's backward to finish.
MAX_IN_FLIGHT = 1


class GradientReducer:
    def __init__(self, buffers: list[FlatBuffer], comm: Comm, stage: int,
                 on_backward_end: Callable[[], None] | None = None) -> None:
        self.buffers = buffers
        self.comm = comm
        self.stage = stage
        self.sync = True
        self._deferred = False  # inside deferred(): gradients stay in p.grad until flush()
        self._on_backward_end = on_backward_end
        self._callback_queued = False
        self._fresh_shard = {b.index: True for b in buffers}  # next reduction overwrites grad_shard
        self._in_flight: list[FlatBuffer] = []
        # Collectives are matched by the order ranks issue them, so every rank reduces the buffers
        # in one agreed order (positions in self.buffers), even when its gradients arrive in
        # another (a parameter it did not use never arrives). A buffer that completes out of
        # order waits for those before it. First guess: stages 0-2 pack buckets in reverse
        # registration order, roughly backward's; stage-3 units are in forward order, backward
        # visits them in reverse and the root (position 0) completes last. From then on: rank 0's
        # arrival order in the previous synced backward, so in steady state nothing waits.
        positions = list(range(len(buffers)))
        self.order = positions[::-1] if stage == 3 else positions
        self._next = 0  # position in self.order of the next buffer to reduce in this backward
        self._arrival: list[int] = []  # buffers in the order they completed in this backward
        self._agreement: tuple[Pending | None, torch.Tensor] | None = None
        self._handles = []
        for position, buffer in enumerate(buffers):
            for i, p in enumerate(buffer.params):
                if buffer.trainable[i]:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(position, buffer, i)))

    def _hook(self, position: int, buffer: FlatBuffer, i: int):
        def hook(p: torch.Tensor) -> None:
            if self._deferred:
                return  # autograd accumulates into p.grad; flush() collects it once
            if not self._callback_queued:  # the first gradient of a backward pass
                self.settle()
                Variable._execution_engine.queue_callback(self._end_of_backward)
                self._callback_queued = True
            if buffer.reduction is not None:  # a second gradient after the buffer's reduction was issued
                self._finish(buffer)
            self._absorb(buffer, i, p)
            if not buffer.arrived[i]:
                buffer.arrived[i] = True
                buffer.num_arrived += 1
                if buffer.complete:
                    self._arrival.append(position)
                    if self.sync:
                        self._launch_in_order()

        return hook

    @staticmethod
    def _absorb(buffer: FlatBuffer, i: int, p: torch.Tensor) -> None:
        """Add ``p.grad`` into parameter ``i``'s place in the flat buffer; ``p.grad`` becomes None."""
        if not any(buffer.written) and buffer.grad_shard is not None and buffer.grad_shard._base is buffer.grad_full \
                and buffer.grad_full is not None:
            # Stage 1 reduced in place into its slice of the full buffer; another synced
            # backward before the step must not overwrite what it accumulates onto.
            buffer.grad_shard = buffer.grad_shard.clone()
        view = buffer.grad_view(i)
        if buffer.written[i]:
            view.add_(p.grad)
        else:
            view.copy_(p.grad)
            buffer.written[i] = True
        p.grad = None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Backward passes inside leave their gradients in ``p.grad``, where autograd accumulates
        them natively, instead of copying each into its flat buffer from a per-parameter hook at
        every backward (a pipeline runs one backward per micro-batch: bench parallel measured
        ~14 ms of hook work per 1F1B step at m=8); ``local_grad`` and ``flush`` collect them once."""
        if self.stage == 3:
            raise RuntimeError("deferred gradients need ZeRO stages 0-2 (stage 3 frees gradients per unit)")
        previous, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = previous

    def _collect_deferred(self) -> None:
        """Move gradients left in ``p.grad`` (by ``deferred`` backwards) into the flat buffers."""
        for buffer in self.buffers:
            for i, p in enumerate(buffer.params):
                if buffer.trainable[i] and p.grad is not None:
                    self._absorb(buffer, i, p)

    def _launch_in_order(self) -> None:
        """Reduce the complete buffers that are next in the agreed order."""
        while self._next < len(self.order) and self.buffers[self.order[self._next]].complete:
            self._launch(self.buffers[self.order[self._next]])
            self._next += 1

    def _launch(self, buffer: FlatBuffer) -> None:
        # Parameters that got no gradient this window (unused in forward) contribute zeros;
        # a persistent stage-1 buffer still holds the previous window's values there.
        for i in range(len(buffer.params)):
            if buffer.trainable[i] and not buffer.written[i]:
                buffer.grad_view(i).zero_()
        buffer.sent = [s or w for s, w in zip(buffer.sent, buffer.written)]
        if self.stage == 0:
            out = buffer.grad_full
            buffer.reduction = self.comm.all_reduce(out, f"all_reduce of the gradients of flat buffer {buffer.index}")
        else:
            fresh = self._fresh_shard[buffer.index] or buffer.grad_shard is None
            if self.stage == 1 and fresh:
                # In place into this rank's slice of the full buffer (no separate shard copy).
                lo, hi = buffer.layout.shard_range(buffer.rank)
                out = buffer.grad_full[lo:hi]
            else:
                out = torch.empty(buffer.layout.shard_numel, dtype=buffer.dtype, device=buffer.device)
            buffer.reduction = self.comm.reduce_scatter(
                out, buffer.grad_full, f"reduce_scatter of the gradients of flat buffer {buffer.index}")
        buffer.reduction.then.append(lambda: self._accumulate(buffer, out))
        self._in_flight.append(buffer)
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._finish(self._in_flight[0])

    def _accumulate(self, buffer: FlatBuffer, reduced: torch.Tensor) -> None:
        reduced.div_(self.comm.world_size)
        if self._fresh_shard[buffer.index] or buffer.grad_shard is None:
            buffer.grad_shard = reduced  # the reduction's output becomes the shard: no copy
            self._fresh_shard[buffer.index] = False
        else:
            buffer.grad_shard.add_(reduced)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        if self.sync:
            # Every buffer, used here or not: another rank may have gradients for it.
            for position in self.order[self._next:]:
                self._launch(self.buffers[position])
            for position in self.order:  # gradients that arrived after their buffer's reduction
                buffer = self.buffers[position]
                if buffer.reduction is None and any(buffer.written):
                    self._launch(buffer)
            self._agree()
        self._next = 0
        self._arrival = []
        for buffer in self.buffers:
            buffer.arrived = [False] * len(buffer.params)
            buffer.num_arrived = 0
            if buffer.reduction is not None:
                self._finish(buffer)
        if self._on_backward_end is not None:
            self._on_backward_end()

    def flush(self) -> None:
        """Reduce the gradients accumulated locally under ``no_sync`` now, without a backward pass
        (what a pipeline schedule does once its last micro-batch's backward has run, after
        summing tied and partial gradients across the other mesh dimensions)."""
        if self._callback_queued:
            raise RuntimeError("flush() inside a backward pass: call it after backward has returned")
        self.settle()
        self._collect_deferred()
        previous, self.sync = self.sync, True
        try:
            self._end_of_backward()
        finally:
            self.sync = previous

    def local_grad(self, name: str) -> torch.Tensor | None:
        """The gradient of parameter ``name`` accumulated on this rank since the last reduction (a
        view into its flat buffer, to modify in place before ``flush``), or None if it has none."""
        self._collect_deferred()
        for buffer in self.buffers:
            for i, param_name in enumerate(buffer.names):
                if param_name == name:
                    return buffer.grad_view(i) if buffer.written[i] else None
        raise KeyError(f"no trainable parameter named {name!r} in this model's flat buffers")

    def _agree(self) -> None:
        """Issue one small all-reduce (after this backward's reductions, so at the same place in
        every rank's sequence of collectives): which parameters some rank sent a gradient for,
        and rank 0's arrival order, the reduction order of the next backward. ``settle`` reads it."""
        sent = [int(s) for buffer in self.buffers for s in buffer.sent]
        arrived = set(self._arrival)
        order = self._arrival + [position for position in self.order if position not in arrived]
        values = sent + (order if self.comm.rank == 0 else [0] * len(order))
        agreed = torch.tensor(values, dtype=torch.int32, device=self.comm.device)
        pending = None
        if self.comm.world_size > 1:
            pending = self.comm.all_reduce(agreed, "all_reduce of the parameters used and the reduction order")
        self._agreement = (pending, agreed)
        for buffer in self.buffers:
            buffer.sent = [False] * len(buffer.params)

    def settle(self) -> None:
        """Apply the last backward's agreement (``has_grad``, ``order``), waiting for it if needed.

        Read lazily, when the flags or the order are needed, so that a device backend does not
        wait for the end of backward there.
        """
        if self._agreement is None:
            return
        pending, agreed = self._agreement
        self._agreement = None
        if pending is not None:
            pending.wait()
        values = agreed.tolist()
        k = 0
        for buffer in self.buffers:
            for i in range(len(buffer.params)):
                buffer.has_grad[i] = buffer.has_grad[i] or values[k] > 0
                k += 1
        self.order = values[k:]

    def _finish(self, buffer: FlatBuffer) -> None:
        """Wait for the buffer's reduction; its gradient window starts afresh."""
        buffer.reduction.wait()
        buffer.reduction = None
        self._in_flight.remove(buffer)
        buffer.written = [False] * len(buffer.params)
        if self.stage != 1:
            # Stage 0: the full buffer became grad_shard. Stages 2-3: no rank keeps a full
            # gradient between backwards. Stage 1 keeps it (ZeRO-1 shards optimizer state only).
            buffer.grad_full = None

    def zero_grad(self, keep_has_grad: bool = False) -> None:
        """Forget reduced and pending local gradients (the next reduction overwrites); with
        ``keep_has_grad`` the parameters that had a gradient keep one (zeros until reduced)."""
        self.settle()
        for buffer in self.buffers:
            if self.stage != 1:
                buffer.grad_full = None  # stage 1 keeps its full gradient buffer (ZeRO-1)
            buffer.grad_shard = None
            buffer.written = [False] * len(buffer.params)
            if not keep_has_grad:
                buffer.has_grad = [False] * len(buffer.params)
            self._fresh_shard[buffer.index] = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
