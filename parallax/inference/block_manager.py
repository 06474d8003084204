"""The paged KV cache's bookkeeping: a block allocator with reference counts, per-sequence block
tables, copy-on-write, and a prefix cache with least-recently-used eviction.

The cache is ``num_blocks`` blocks of ``block_size`` token slots (the tensors themselves live in
the model runner; this module only hands out block ids). Token ``t`` of a sequence lives in slot
``t % block_size`` of block ``table[t // block_size]``.

Every block is in exactly one of three states:

* used: referenced by at least one block table (``refcount > 0``);
* cached: unreferenced but holding a full block that the prefix cache can still hand out; these
  are evicted least recently freed first when fresh blocks run out;
* free: unreferenced and holding nothing worth keeping.

Blocks are shared in two ways. A full block is found again by its content: its key hashes
(parent block's key, its tokens), so equal keys mean equal whole prefixes; full blocks are never
written again, so sharing them needs no copy. A sequence served through a LoRA adapter chains its
keys from that adapter's root key (``prefix_root``): its KV differs from the base model's, so
requests for different adapters never share blocks, and requests for the same one still do. ``fork`` shares every block of a sequence with a
new one (parallel sampling), including a partly filled last block: whichever sequence writes
into a shared block first gets a private copy (copy-on-write), queued for the model runner by
``take_copies``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BlockManager", "KVCacheStats", "block_keys", "prefix_root"]

_ROOT_KEY = b""  # the parent key of a sequence's first block (the base model's)


def prefix_root(lora: str | None) -> bytes:
    """The parent key of the first block of a sequence served through adapter ``lora`` (None:
    the base model). An engine never reuses an adapter name, so the name identifies the weights."""
    if lora is None:
        return _ROOT_KEY
    return hashlib.sha256(b"lora\0" + lora.encode()).digest()


def block_keys(token_ids: Sequence[int], block_size: int, num_blocks: int, parent: bytes = _ROOT_KEY) -> list[bytes]:
    """Prefix-cache keys of the first ``num_blocks`` full blocks of ``token_ids``, chained from ``parent``.

    Each key is a SHA-256 digest of (parent key, the block's tokens), so two blocks have the
    same key only when the whole prefixes up to their ends are equal.
    """
    keys = []
    for i in range(num_blocks):
        tokens = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.sha256(parent + tokens).digest()
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the block pool.

    used / free / cached: blocks in each state (they add up to num_blocks). hit_rate: share of
    the prompt tokens looked up in the prefix cache that were found there (0 before any
    lookup). waste: share of the slots of used blocks that hold no token (0 when none is used).
    """

    num_blocks: int
    block_size: int
    used: int
    free: int
    cached: int
    hit_rate: float
    waste: float
    tokens: int  # tokens held in used blocks (each physical slot counted once)
    hit_tokens: int
    queried_tokens: int


class BlockManager:
    """Block allocator, block tables, copy-on-write and prefix cache of one KV-cache pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockManager: {name} must be a positive integer; got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_blocks
        self._filled = [0] * num_blocks  # slots of each block holding a token
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently freed first
        self._key_of: dict[int, bytes] = {}  # block -> its prefix-cache key (full blocks only)
        self._block_of: dict[bytes, int] = {}  # key -> block
        self._tables: dict[int, list[int]] = {}
        self._keys: dict[int, list[bytes]] = {}  # seq -> keys of its full, computed blocks
        self._roots: dict[int, bytes] = {}  # seq -> parent key of its first block, when not _ROOT_KEY
        self._copies: list[tuple[int, int]] = []
        self._hit_tokens = 0
        self._queried_tokens = 0

    # -- queries ---------------------------------------------------------------------------------

    @property
    def num_available(self) -> int:
        """Blocks that an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        """The block ids of sequence ``seq_id``, in token order (a copy)."""
        return list(self._tables.get(seq_id, ()))

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def state(self, block: int) -> str:
        """'used', 'cached' or 'free'."""
        if self._refcount[block] > 0:
            return "used"
        return "cached" if block in self._evictable else "free"

    def stats(self) -> KVCacheStats:
        used = [b for b in range(self.num_blocks) if self._refcount[b] > 0]
        tokens = sum(self._filled[b] for b in used)
        slots = len(used) * self.block_size
        return KVCacheStats(
            num_blocks=self.num_blocks, block_size=self.block_size, used=len(used), free=len(self._free),
            cached=len(self._evictable),
            hit_rate=self._hit_tokens / self._queried_tokens if self._queried_tokens else 0.0,
            waste=1.0 - tokens / slots if slots else 0.0, tokens=tokens,
            hit_tokens=self._hit_tokens, queried_tokens=self._queried_tokens,
        )

    # -- prefix cache ----------------------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], root: bytes = _ROOT_KEY) -> list[int]:
        """Cached blocks holding the longest prefix of ``token_ids`` made of full blocks, for a
        sequence whose keys chain from ``root`` (``prefix_root`` of its adapter).

        At most ``len(token_ids) - 1`` tokens are matched: the last token is always computed
        again, since its logits are needed. Nothing is taken: pass the result to ``allocate``.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in block_keys(token_ids, self.block_size, (len(token_ids) - 1) // self.block_size, root):
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Make the full blocks among the first ``num_computed`` (written) tokens of ``seq_id``
        findable by ``lookup``. A block whose content is already cached elsewhere stays private."""
        if not self.enable_prefix_caching:
            return
        keys, table = self._keys[seq_id], self._tables[seq_id]
        full = num_computed // self.block_size
        if full <= len(keys):
            return
        parent = keys[-1] if keys else self._roots.get(seq_id, _ROOT_KEY)
        new = block_keys(token_ids[len(keys) * self.block_size:], self.block_size, full - len(keys), parent)
        for i, key in enumerate(new, start=len(keys)):
            block = table[i]
            if block not in self._key_of and key not in self._block_of:
                self._key_of[block] = key
                self._block_of[key] = block
        keys.extend(new)

    # -- allocation ------------------------------------------------------------------------------

    def allocate(self, seq_id: int, num_computed: int, num_new: int, cached: Sequence[int] = (),
                 num_looked_up: int | None = None, root: bytes = _ROOT_KEY) -> bool:
        """Give ``seq_id`` the slots of tokens ``[num_computed, num_computed + num_new)``.

        A new sequence starts from the ``cached`` blocks of a ``lookup`` (then ``num_computed``
        must be ``len(cached) * block_size``) over ``num_looked_up`` tokens (for the hit rate;
        default ``num_computed + num_new``). If the first slot to write is in a block shared
        with another sequence, the sequence gets its own copy first (copy-on-write; see
        ``take_copies``). ``root``: the new sequence's first parent key, as given to ``lookup``.
        Returns False, changing nothing, when there are not enough blocks.
        """
        new_seq = seq_id not in self._tables
        table = [] if new_seq else self._tables[seq_id]
        if new_seq and num_computed != len(cached) * self.block_size:
            raise ValueError(f"BlockManager.allocate: a new sequence with {len(cached)} cached blocks has "
                             f"num_computed={len(cached) * self.block_size}; got {num_computed}")
        if not new_seq and cached:
            raise ValueError(f"BlockManager.allocate: sequence {seq_id} already has blocks; cached must be empty")
        held = len(cached) if new_seq else len(table)
        if held < self.blocks_needed(num_computed):
            raise ValueError(f"BlockManager.allocate: sequence {seq_id} holds {held} blocks, fewer than its "
                             f"{num_computed} computed tokens need")
        total = num_computed + num_new
        fresh = max(0, self.blocks_needed(total) - held)
        write_block = num_computed // self.block_size
        cow = (num_new > 0 and not new_seq and num_computed % self.block_size != 0
               and self._refcount[table[write_block]] > 1)
        reviving = sum(1 for b in cached if self._refcount[b] == 0)  # cached hits leave the evictable pool
        if fresh + cow + reviving > self.num_available:
            return False

        if new_seq:
            for b in cached:
                self._take(b)
            table = list(cached)
            self._tables[seq_id] = table
            self._keys[seq_id] = [self._key_of[b] for b in cached]
            if root != _ROOT_KEY:
                self._roots[seq_id] = root
            self._hit_tokens += len(cached) * self.block_size
            self._queried_tokens += total if num_looked_up is None else num_looked_up
        if cow:
            src = table[write_block]
            dst = self._pop_block()
            self._filled[dst] = self._filled[src]
            self._refcount[src] -= 1  # still > 0: the other sharers keep it
            self._refcount[dst] = 1
            table[write_block] = dst
            self._copies.append((src, dst))
        for _ in range(fresh):
            b = self._pop_block()
            self._refcount[b] = 1
            table.append(b)
        for i in range(write_block, self.blocks_needed(total)):
            b = table[i]
            self._filled[b] = max(self._filled[b], min(self.block_size, total - i * self.block_size))
        return True

    def fork(self, parent_id: int, child_id: int) -> None:
        """Share every block of ``parent_id`` with the new sequence ``child_id``."""
        if child_id in self._tables:
            raise ValueError(f"BlockManager.fork: sequence {child_id} already has blocks")
        table = self._tables[parent_id]
        for b in table:
            self._refcount[b] += 1
        self._tables[child_id] = list(table)
        self._keys[child_id] = list(self._keys[parent_id])
        if parent_id in self._roots:
            self._roots[child_id] = self._roots[parent_id]

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id``'s references; blocks nobody holds become cached (if findable) or free."""
        table = self._tables.pop(seq_id, None)
        self._keys.pop(seq_id, None)
        self._roots.pop(seq_id, None)
        if table is None:
            return
        # Last blocks first: a prefix is reused from its start, so its tail is evicted first.
        for b in reversed(table):
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._filled[b] = 0
                    self._free.append(b)

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies that copy-on-write queued since the last call;
        the caller must copy the KV of every layer before writing new tokens."""
        copies, self._copies = self._copies, []
        return copies

    # -- internals -------------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        """Add a reference to a cached block found by ``lookup``."""
        if self._refcount[block] == 0:
            del self._evictable[block]
        self._refcount[block] += 1

    def _pop_block(self) -> int:
        """A block for new content: a free one, else the least recently freed cached one."""
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self._filled[block] = 0
        return block
