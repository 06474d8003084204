"""BlockManager: allocator invariants under random operation sequences (a hypothesis state machine
over a shadow KV cache), copy-on-write, prefix-cache hits and LRU eviction, stats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from parallax.inference.block_manager import BlockManager


class _Seq:
    def __init__(self, tokens: list[int], computed: int) -> None:
        self.tokens = tokens
        self.computed = computed


class AllocatorMachine(RuleBasedStateMachine):
    """Sequences are created (with prefix-cache lookups), computed in chunks, extended, forked and
    freed at random. A shadow cache holds what the model would write in every slot: like a token's
    K/V, it depends on the whole prefix up to that token (an id of the prefix stands for it).
    Every computed token of every live sequence must find its own value in its slot, whatever was
    shared, copied or evicted."""

    @initialize(num_blocks=st.integers(3, 14), block_size=st.integers(1, 4), caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.shadow = np.full((num_blocks, block_size), -1)
        self.seqs: dict[int, _Seq] = {}
        self.next_id = 0
        self.prefix_ids: dict[tuple[int, ...], int] = {}

    def _kv(self, tokens: list[int], p: int) -> int:
        """The stand-in for the K/V of token p: an id of tokens[:p + 1]."""
        return self.prefix_ids.setdefault(tuple(tokens[:p + 1]), len(self.prefix_ids))

    def _write(self, seq_id: int, seq: _Seq, num_new: int) -> None:
        """What the model runner does after a successful allocate: copies, then new tokens."""
        for src, dst in self.bm.take_copies():
            assert self.bm.refcount(src) >= 1 and self.bm.refcount(dst) == 1
            self.shadow[dst] = self.shadow[src]
        table = self.bm.block_table(seq_id)
        written = set()
        for p in range(seq.computed, seq.computed + num_new):
            block = table[p // self.bs]
            self.shadow[block, p % self.bs] = self._kv(seq.tokens, p)
            written.add(block)
        for block in written:  # copy-on-write: a sequence only ever writes into its own blocks
            assert self.bm.refcount(block) == 1, (block, self.bm.refcount(block))
        seq.computed += num_new
        self.bm.cache_full_blocks(seq_id, seq.tokens, seq.computed)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=18), data=st.data())
    def add(self, tokens: list[int], data) -> None:
        cached = self.bm.lookup(tokens)
        assert len(cached) * self.bs <= len(tokens) - 1
        for i, block in enumerate(cached):  # a hit holds exactly the K/V of this prefix
            assert list(self.shadow[block]) == [self._kv(tokens, p) for p in range(i * self.bs, (i + 1) * self.bs)]
            assert self.bm.state(block) in ("used", "cached")
        computed = len(cached) * self.bs
        num_new = data.draw(st.integers(1, len(tokens) - computed))
        seq_id, self.next_id = self.next_id, self.next_id + 1
        before = self._snapshot()
        if self.bm.allocate(seq_id, computed, num_new, cached):
            seq = _Seq(list(tokens), computed)
            self.seqs[seq_id] = seq
            self._write(seq_id, seq, num_new)
        else:
            assert self._snapshot() == before, "a failed allocate changed the pool"

    @precondition(lambda self: any(s.computed < len(s.tokens) for s in self.seqs.values()))
    @rule(data=st.data())
    def compute(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(i for i, s in self.seqs.items() if s.computed < len(s.tokens))))
        seq = self.seqs[seq_id]
        num_new = data.draw(st.integers(1, len(seq.tokens) - seq.computed))
        before = self._snapshot()
        if self.bm.allocate(seq_id, seq.computed, num_new):
            self._write(seq_id, seq, num_new)
        else:
            assert self._snapshot() == before, "a failed allocate changed the pool"

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), more=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def extend(self, data, more: list[int]) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.seqs[seq_id].tokens.extend(more)  # sampled tokens, not computed yet

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = _Seq(p.tokens[:p.computed], p.computed)  # siblings go their own way from here

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        del self.seqs[seq_id]
        self.bm.free(seq_id)

    def _snapshot(self):
        tables = {i: self.bm.block_table(i) for i in self.seqs}
        return tables, [self.bm.refcount(b) for b in range(self.bm.num_blocks)], self.bm.stats()

    @invariant()
    def refcounts_and_states(self) -> None:
        if not hasattr(self, "bm"):
            return
        counts = [0] * self.bm.num_blocks
        for seq_id in self.seqs:
            for block in self.bm.block_table(seq_id):
                counts[block] += 1
        for block in range(self.bm.num_blocks):
            assert self.bm.refcount(block) == counts[block], (block, self.bm.refcount(block), counts[block])
            # used iff referenced: no block is both free (or cached) and in use
            assert (self.bm.state(block) == "used") == (counts[block] > 0)
        stats = self.bm.stats()
        assert stats.used + stats.free + stats.cached == self.bm.num_blocks
        assert stats.used == sum(1 for c in counts if c)
        assert self.bm.num_available == stats.free + stats.cached
        if not self.bm.enable_prefix_caching:
            assert stats.cached == 0

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq_id, seq in self.seqs.items():
            table = self.bm.block_table(seq_id)
            assert len(table) == self.bm.blocks_needed(seq.computed)
            for p in range(seq.computed):
                assert self.shadow[table[p // self.bs], p % self.bs] == self._kv(seq.tokens, p), (seq_id, p)

    @invariant()
    def waste_counts_the_empty_slots(self) -> None:
        if not hasattr(self, "bm"):
            return
        filled: dict[int, int] = {}
        for seq_id, seq in self.seqs.items():
            for i, block in enumerate(self.bm.block_table(seq_id)):
                filled[block] = max(filled.get(block, 0), min(self.bs, seq.computed - i * self.bs))
        stats = self.bm.stats()
        assert stats.tokens == sum(filled.values())
        slots = len(filled) * self.bs
        assert stats.waste == pytest.approx(1 - sum(filled.values()) / slots if slots else 0.0)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def _run(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """Allocate and 'compute' a whole new sequence, using the prefix cache; returns its table."""
    cached = bm.lookup(tokens)
    computed = len(cached) * bm.block_size
    assert bm.allocate(seq_id, computed, len(tokens) - computed, cached)
    bm.cache_full_blocks(seq_id, tokens, len(tokens))
    return bm.block_table(seq_id)


def test_fork_then_write_copies_the_shared_partial_block():
    bm = BlockManager(8, 4)
    table = _run(bm, 0, [1, 2, 3, 4, 5, 6])  # one full block, one half-full block
    bm.fork(0, 1)
    assert [bm.refcount(b) for b in table] == [2, 2]
    assert bm.allocate(1, 6, 1)  # the child writes token 6: into the shared half-full block
    (src, dst), = bm.take_copies()
    assert src == table[1] and dst not in table
    assert bm.block_table(1) == [table[0], dst] and bm.block_table(0) == table
    assert [bm.refcount(b) for b in table] == [2, 1] and bm.refcount(dst) == 1
    assert bm.allocate(0, 6, 1) and bm.take_copies() == []  # the parent now owns its block alone
    assert bm.allocate(1, 7, 2) and bm.take_copies() == []  # full shared blocks are never written


def test_prefix_hits_reuse_blocks_and_the_last_token_is_recomputed():
    bm = BlockManager(8, 2)
    first = _run(bm, 0, [5, 6, 7, 8, 9])
    assert bm.lookup([5, 6, 7, 8, 1, 1]) == first[:2]
    assert bm.lookup([5, 6, 7, 8]) == first[:1]  # at most len - 1 tokens match
    assert bm.lookup([5, 7, 7, 8, 9]) == []  # a different first block: nothing below it matches
    second = _run(bm, 1, [5, 6, 7, 8, 0, 0])
    assert second[:2] == first[:2] and bm.refcount(first[0]) == 2
    stats = bm.stats()
    assert stats.hit_tokens == 4 and stats.queried_tokens == 11


def test_unreferenced_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(4, 2)
    a = _run(bm, 0, [1, 1, 1])  # blocks: [1, 1] full (cached when freed), [1] partial
    b = _run(bm, 1, [2, 2, 2])
    bm.free(1)
    bm.free(0)  # a's blocks were freed last
    stats = bm.stats()
    assert (stats.used, stats.cached, stats.free) == (0, 2, 2)
    # two fresh blocks come from the free list, the third evicts b's cached block, not a's
    assert bm.allocate(2, 0, 6)
    assert b[0] in bm.block_table(2) and a[0] not in bm.block_table(2)
    assert bm.lookup([2, 2, 2]) == [] and bm.lookup([1, 1, 1]) == [a[0]]
    assert not bm.allocate(3, 0, 4), "only one block is left"
    bm.free(2)
    hit = bm.lookup([1, 1, 1])
    assert bm.allocate(3, 2, 1, hit) and bm.block_table(3)[0] == a[0] and bm.refcount(a[0]) == 1


def test_stats_waste_is_the_share_of_empty_slots_in_used_blocks():
    bm = BlockManager(10, 4)
    _run(bm, 0, list(range(5)))  # 2 blocks, 5 tokens
    _run(bm, 1, list(range(10, 18)))  # 2 blocks, 8 tokens
    stats = bm.stats()
    assert (stats.used, stats.tokens) == (4, 13)
    assert stats.waste == pytest.approx(1 - 13 / 16)
    bm.free(0)
    bm.free(1)
    assert bm.stats().waste == 0.0 and bm.stats().used == 0


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
