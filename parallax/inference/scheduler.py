"""Continuous batching: which sequences run this step, and how many tokens each computes.

Every sequence is scheduled the same way, whether it is prefilling its prompt, decoding, or
being recomputed after preemption: it computes ``num_uncomputed`` tokens (prompt prefill: the
prompt; decode: the one sampled last step; recompute: everything), cut to what is left of the
step's token budget (chunked prefill). Sequences that reach their last token sample.

Each step the running sequences go first, oldest first, then waiting ones are admitted in
arrival order while the token budget (``max_num_batched_tokens``), the sequence limit
(``max_num_seqs``) and the free KV blocks allow. When a running sequence cannot get blocks, the
newest running sequence is preempted (its blocks freed, its tokens kept) and put back at the
head of the waiting queue, to be recomputed later (cheaply, if the prefix cache still holds its
blocks). No request is dropped: the pool holds at least one full-length sequence, so the
oldest one can always finish alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from parallax.inference.block_manager import BlockManager, prefix_root
from parallax.inference.sequence import Sequence, SequenceStatus

__all__ = ["Scheduler", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    """One step's work: (sequence, tokens to compute) in batch order, and who was preempted."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Waiting and running queues over one ``BlockManager``."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence behind the waiting ones."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Add a sequence that already holds blocks (a fork) as the newest running one."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from the queues and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed, budget)
            if not self._allocate_or_preempt(seq, num_new, out):
                break  # seq itself was preempted: it was the last running one
            out.scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        if out.preempted:
            return out  # the pool is full: admit nobody this step
        # a sequence that will fork holds seats for its future siblings
        seats = sum(s.fork_n for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seats + seq.fork_n > self.max_num_seqs:
                break
            root = prefix_root(seq.request.lora)  # an adapter's KV is its own
            cached = self.blocks.lookup(seq.token_ids, root)
            num_computed = len(cached) * self.blocks.block_size
            num_new = min(len(seq.token_ids) - num_computed, budget)
            if not self.blocks.allocate(seq.seq_id, num_computed, num_new, cached,
                                        num_looked_up=len(seq.token_ids), root=root):
                break
            self.waiting.popleft()
            seq.num_computed = num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, num_new))
            budget -= num_new
            seats += seq.fork_n
        return out

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Allocate ``seq``'s slots, preempting the newest running sequences until they fit;
        False when ``seq`` itself had to go."""
        while not self.blocks.allocate(seq.seq_id, seq.num_computed, num_new):
            victim = self.running.pop()  # the newest; never one scheduled earlier this step
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
