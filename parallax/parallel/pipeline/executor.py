"""``PipelineSchedule``: run a schedule's actions on this rank's ``PipelineStage``.

Activations go forward and their gradients backward with ``torch.distributed`` point-to-point
``isend``/``irecv`` between the ranks of ``mesh.pp_ranks``. Every message carries a tag built
from (micro-batch, virtual stage, direction), so a receive can only match its own message even
when ranks issue them in different orders (gloo). Sends are asynchronous and waited for at the
end of the step; receives block, so a rank waits only for what its next action needs. The two
directions use two process groups over the pipeline: NCCL ignores tags and runs a pair's
operations in issue order on one stream, where an activation send queued before a gradient
receive could wait for a peer that waits for us; per direction, both ends issue a pair's
messages in the same (schedule) order, so that cannot happen.

Gradients accumulate locally (in ``p.grad``, under the reducer's ``deferred``) over all
micro-batches; then the tied
embedding / LM head gradients are summed between the first and last stage, and
``reducer.flush()`` reduces everything over the data-parallel group once.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from parallax.parallel.mesh import Mesh
from parallax.parallel.pipeline.schedules import Action, bubble_fraction, check_schedule, schedule_actions
from parallax.parallel.pipeline.split import PipelineStage
from parallax.parallel.state import parallel_state
from parallax.zero.module import zero_state
from parallax.zero.optimizer import ZeroOptimizer

__all__ = ["PipelineSchedule"]

log = logging.getLogger(__name__)

FORWARD, BACKWARD, TIED = 0, 1, 2


class PipelineSchedule:
    """Train/eval steps of a pipeline-parallel model (one object per rank, all built alike).

    ``stage``: this rank's ``build_stage`` result after ``px.initialize`` (ZeRO stages 0-2 over
    ``mesh.dp_group``); ``optimizer``: its ``ZeroOptimizer``; ``schedule``: "gpipe", "1f1b" or
    "interleaved" (the stage's number of chunks is its virtual stages); ``micro_batches``: M,
    which must divide the batch.
    """

    def __init__(self, stage: PipelineStage, optimizer: ZeroOptimizer, mesh: Mesh, schedule: str = "1f1b",
                 micro_batches: int = 1) -> None:
        if not isinstance(stage, PipelineStage):
            raise ValueError(f"stage must be a PipelineStage from build_stage (pp > 1), got {type(stage).__name__}")
        zero = zero_state(stage)
        if zero.stage == 3:
            raise ValueError("ZeRO stage 3 cannot run under pipeline parallelism (pp > 1): each micro-batch would "
                             "gather every block's parameters again; use zero_stage 1 or 2")
        check_schedule(schedule, mesh.dims.pp, micro_batches, len(stage.chunks))
        self.stage = stage
        self.optimizer = optimizer
        self.mesh = mesh
        self.schedule = schedule
        self.micro_batches = micro_batches
        self.actions = schedule_actions(schedule, mesh.dims.pp, micro_batches, len(stage.chunks))[mesh.pp_rank]
        self.reducer = zero.reducer
        self.groups = _direction_groups(mesh)
        self.device = next(stage.parameters()).device
        self.dtype = next(p.dtype for p in stage.parameters() if p.is_floating_point())
        self._num_stages = stage.num_chunks_total
        log.info("pipeline: rank %d of %d, schedule %s, %d micro-batches, %d virtual stage(s) per rank, "
                 "ideal bubble %.1f%%", mesh.pp_rank, mesh.dims.pp, schedule, micro_batches, len(stage.chunks),
                 100 * bubble_fraction(mesh.dims.pp, micro_batches, len(stage.chunks)))

    # ------------------------------------------------------------------ public steps

    def train_step(self, idx: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Forward and backward of the batch idx, targets (B, T) in ``micro_batches`` pieces;
        gradients of ``weight * mean loss over the batch's targets`` end up reduced in the ZeRO
        shards (step the optimizer afterwards). Returns the batch's mean loss (detached, fp32) on
        every rank of the pipeline."""
        batches = self._split(idx, targets)
        shares = self._target_shares(targets, batches)
        run = _Run(self, batches, shares, weight, train=True)
        with self.reducer.deferred():
            run.run(self.actions)
        self._sum_tied_gradients()
        self.reducer.flush()
        return self._broadcast_loss(run.loss)

    @torch.no_grad()
    def eval_step(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (forward only), on every rank of the pipeline."""
        batches = self._split(idx, targets)
        shares = self._target_shares(targets, batches)
        run = _Run(self, batches, shares, 1.0, train=False)
        run.run([Action("forward", i, self.stage.virtual_stage(chunk))
                 for i in range(self.micro_batches) for chunk in range(len(self.stage.chunks))])
        return self._broadcast_loss(run.loss)

    # ------------------------------------------------------------------ pieces

    def _split(self, idx: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if idx.dim() != 2 or targets.shape != idx.shape:
            raise ValueError(f"idx and targets must both be (B, T); got {tuple(idx.shape)} and {tuple(targets.shape)}")
        if idx.size(0) % self.micro_batches:
            raise ValueError(f"the batch of {idx.size(0)} sequences does not split into micro_batches="
                             f"{self.micro_batches} equal micro-batches")
        state = parallel_state(self.stage)
        if state is not None and state.sequence_parallel and idx.size(1) % self.mesh.dims.tp:
            raise ValueError(f"sequence parallelism splits the sequence over tp={self.mesh.dims.tp} ranks; "
                             f"the sequence length {idx.size(1)} is not divisible by it")
        return list(zip(idx.chunk(self.micro_batches), targets.chunk(self.micro_batches)))

    @staticmethod
    def _target_shares(targets: torch.Tensor, batches: list) -> list[float]:
        """Each micro-batch's share of the batch's targets (negative targets are ignored), so that
        the shares' weighted micro-batch means give the batch mean."""
        counts = [int((t >= 0).sum()) for _, t in batches]
        total = sum(counts)
        return [c / total for c in counts] if total else [1.0 / len(batches)] * len(batches)

    def activation_shape(self, micro_batch: torch.Tensor) -> tuple[int, int, int]:
        """(B/M, T, C) of the stream between stages, or (B/M, T/tp, C) under sequence parallelism."""
        b, t = micro_batch.shape
        state = parallel_state(self.stage)
        tp = self.mesh.dims.tp
        if state is not None and state.sequence_parallel and tp > 1:
            t //= tp
        return b, t, self.stage.hidden_size

    def rank_of(self, virtual_stage: int) -> int:
        return self.mesh.pp_ranks[virtual_stage % self.mesh.dims.pp]

    def tag(self, micro_batch: int, virtual_stage: int, direction: int) -> int:
        """Unique per message of a step: the receive matches its own send whatever the order."""
        return (micro_batch * self._num_stages + virtual_stage) * 3 + direction

    def _sum_tied_gradients(self) -> None:
        """Tied embedding / LM head: each holder's gradient becomes the sum of both, so both copies
        take the same step and stay identical."""
        state = parallel_state(self.stage)
        for name, other in sorted(state.pp_tied.items()):
            grad = self.reducer.local_grad(name)
            if grad is None:
                raise RuntimeError(f"the tied parameter {name} got no gradient on pipeline rank "
                                   f"{self.mesh.pp_rank}; both holders must use it in every step")
            theirs = torch.empty_like(grad)
            tag = self.tag(0, 0, TIED)
            # One batch: NCCL runs both at once (two blocking sends first would wait for each other).
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, grad.clone(), other, tag=tag),
                                                dist.P2POp(dist.irecv, theirs, other, tag=tag)]):
                work.wait()
            grad.add_(theirs)

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        value = loss.detach().float().reshape(1).to(self.device) if loss is not None else \
            torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.mesh.dims.pp > 1:
            dist.broadcast(value, self.mesh.pp_ranks[-1], group=self.mesh.pp_group)
        return value[0]


class _Run:
    """One step's state: inputs and outputs kept for backward, sends in flight, the loss."""

    def __init__(self, schedule: "PipelineSchedule", batches: list, shares: list[float], weight: float,
                 train: bool) -> None:
        self.pipe = schedule
        self.batches = batches
        self.shares = shares
        self.weight = weight
        self.train = train
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.sends: list = []
        self.loss: torch.Tensor | None = None
        self.contexts: dict[int, tuple] = {}
        self.posted: dict[tuple[int, int, int], tuple] = {}  # (micro-batch, stage, direction) -> (work, buffer)
        self.last = schedule._num_stages - 1

    def run(self, actions: list[Action]) -> None:
        """Run ``actions`` in order, each next action's receive posted before the current one runs,
        so its message arrives while this rank computes (bench parallel: a receive posted only when
        needed left 1F1B at 1.03-1.07x torch.distributed.pipelining's step)."""
        for k, action in enumerate(actions):
            if k + 1 < len(actions):
                self._post(actions[k + 1])
            (self._forward if action.op == "forward" else self._backward)(action.micro_batch, action.stage)
        self.finish_sends()

    def _post(self, action: Action) -> None:
        """Issue the receive ``action`` will wait for, if it needs one and its shape is known."""
        i, stage = action.micro_batch, action.stage
        if action.op == "forward" and stage > 0:
            self._irecv(self.pipe.activation_shape(self.batches[i][0]), stage - 1, i, stage, FORWARD)
        elif action.op == "backward" and stage < self.last and (i, stage) in self.saved:
            self._irecv(self.saved[(i, stage)][1].shape, stage + 1, i, stage, BACKWARD)

    def _context(self, i: int) -> tuple:
        if i not in self.contexts:
            self.contexts[i] = self.pipe.stage.block_context(self.batches[i][0])
        return self.contexts[i]

    def _irecv(self, shape, src_stage: int, i: int, stage: int, direction: int) -> None:
        key = (i, stage, direction)
        if key not in self.posted:
            buf = torch.empty(shape, dtype=self.pipe.dtype, device=self.pipe.device)
            work = dist.irecv(buf, self.pipe.rank_of(src_stage), group=self.pipe.groups[direction],
                              tag=self.pipe.tag(i, stage, direction))
            self.posted[key] = (work, buf)

    def _recv(self, shape, src_stage: int, i: int, stage: int, direction: int) -> torch.Tensor:
        self._irecv(shape, src_stage, i, stage, direction)
        work, buf = self.posted.pop((i, stage, direction))
        work.wait()
        return buf

    def _send(self, tensor: torch.Tensor, dst_stage: int, i: int, stage: int, direction: int) -> None:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, self.pipe.rank_of(dst_stage), group=self.pipe.groups[direction],
                          tag=self.pipe.tag(i, stage, direction))
        self.sends.append((work, tensor))  # the tensor must live until the send completes

    def _forward(self, i: int, stage: int) -> None:
        idx, targets = self.batches[i]
        chunk = stage // self.pipe.mesh.dims.pp
        if stage == 0:
            x_in = None
            x = self.pipe.stage.embed(idx)
        else:
            # Tagged with the receiving stage: the message of micro-batch i into stage `stage`.
            x_in = self._recv(self.pipe.activation_shape(idx), stage - 1, i, stage, FORWARD)
            x_in.requires_grad_(self.train)
            x = x_in
        out = self.pipe.stage.run_blocks(chunk, x, self._context(i))
        if stage == self.last:
            mean = self.pipe.stage.head_loss(out, targets)
            share = self.shares[i]
            self.loss = mean.detach().float() * share + (self.loss if self.loss is not None else 0.0)
            out = mean * (share * self.weight)
        else:
            self._send(out, stage + 1, i, stage + 1, FORWARD)
        if self.train:
            self.saved[(i, stage)] = (x_in, out)

    def _backward(self, i: int, stage: int) -> None:
        x_in, out = self.saved.pop((i, stage))
        if stage == self.last:
            self.pipe.optimizer.backward(out)
        else:
            grad = self._recv(out.shape, stage + 1, i, stage, BACKWARD)
            torch.autograd.backward(out, grad_tensors=grad)
        if x_in is not None:
            self._send(x_in.grad, stage - 1, i, stage - 1, BACKWARD)

    def finish_sends(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()


def _direction_groups(mesh) -> dict[int, dist.ProcessGroup]:
    """This rank's pipeline as two process groups, one for activations and one for gradients.
    ``new_group`` is collective over the world: every rank creates every pipeline's pair, in order."""
    dims = mesh.dims
    mine: dict[int, dist.ProcessGroup] = {}
    for d in range(dims.dp):
        for t in range(dims.tp):
            members = [dims.rank_of(p, d, t) for p in range(dims.pp)]
            groups = {direction: dist.new_group(members) for direction in (FORWARD, BACKWARD)}
            if mesh.rank in members:
                mine = groups
    return mine
