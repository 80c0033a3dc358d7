"""Reference-counted pool of block ids for one cache kind, with a content-hash cache of freed blocks."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

NULL_BLOCK = 0


class KVIntegrityError(AssertionError):
    """A block pool or block table broke one of its invariants (a bug, never a user error)."""


class OutOfBlocksError(RuntimeError):
    """An allocation asked for more blocks than the pool can hand out; check `can_allocate` first."""

    def __init__(self, kind: str, requested: int, available: int) -> None:
        super().__init__(f"{kind or 'block'} pool: asked for {requested} blocks, only {available} allocatable")
        self.kind = kind
        self.requested = requested
        self.available = available


class BlockPool:
    """Block ids `1 .. num_blocks-1` of one kind; id 0 is the null block, never handed out.

    Every id is in exactly one state:
    - used: reference count >= 1, owned by the holders that allocated or incref'd it;
    - free: count 0, no content hash, on the free list;
    - cached: count 0 with a content hash, on an LRU (least recently freed first). It stays
      findable by `lookup` until an allocation needs its id; `incref` on it revives it.
    `allocate` takes free ids first and evicts cached ones only when the free list is empty, so
    `num_free` (what can be allocated) counts both. All operations are O(1) per id.
    """

    def __init__(self, num_blocks: int, kind: str = "") -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"{kind or 'block'} pool: num_blocks = {num_blocks!r}, need >= 1 (id 0 is the null block)")
        self.kind = kind
        self._where = f"{kind or 'block'} pool"
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self._num_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free plus cached (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """`n` ids with reference count 1, taking free ids before evicting the oldest cached ones."""
        if n < 0:
            raise ValueError(f"{self._where}: cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocksError(self.kind, n, self.num_free)
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
                self.evictions += 1
            self._refs[block] = 1
            out.append(block)
        self._num_used += n
        return out

    def _check_id(self, block: int) -> None:
        if not isinstance(block, int) or not 0 < block < self.num_blocks:
            raise ValueError(f"{self._where}: {block!r} is not an allocatable block id (1..{self.num_blocks - 1})")

    def free(self, ids: Iterable[int]) -> None:
        """Drop one reference per id; at zero an id goes to the cached LRU if it has a hash, else the free list.

        All ids are checked before any changes, so a bad call (double free) leaves the pool as it was.
        """
        ids = list(ids)
        drops: dict[int, int] = {}
        for block in ids:
            self._check_id(block)
            drops[block] = drops.get(block, 0) + 1
        for block, count in drops.items():
            if self._refs[block] < count:
                raise ValueError(
                    f"{self._where}: freeing block {block} {count} time(s) but it holds "
                    f"{self._refs[block]} reference(s) (double free?)"
                )
        for block in ids:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._num_used -= 1
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def incref(self, ids: Iterable[int]) -> None:
        """Add one reference per id; an id must be used or cached (a cached one is revived)."""
        ids = list(ids)
        for block in ids:
            self._check_id(block)
            if self._refs[block] == 0 and block not in self._cached:
                raise ValueError(f"{self._where}: incref of block {block}, which is free (not allocated)")
        for block in ids:
            if self._refs[block] == 0:
                del self._cached[block]
                self._num_used += 1
            self._refs[block] += 1

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def hash_of(self, block: int) -> int | None:
        return self._hash_of.get(block)

    def peek(self, content_hash: int) -> int | None:
        """The block holding `content_hash` (used or cached), without touching the hit counters."""
        return self._block_of.get(content_hash)

    def lookup(self, content_hash: int) -> int | None:
        """Like `peek`, counting a hit or a miss."""
        block = self._block_of.get(content_hash)
        if block is None:
            self.misses += 1
        else:
            self.hits += 1
        return block

    def set_hash(self, block: int, content_hash: int) -> bool:
        """Name a used block's content; False (and no change) if another block already holds this hash.

        A block's hash is fixed while it lives: naming it differently is an error. The hash is
        dropped when the id is evicted for reuse.
        """
        self._check_id(block)
        if self._refs[block] == 0:
            raise ValueError(f"{self._where}: set_hash on block {block}, which is not allocated")
        current = self._hash_of.get(block)
        if current is not None:
            if current != content_hash:
                raise ValueError(
                    f"{self._where}: block {block} already holds hash {current:#x}, not {content_hash:#x}"
                )
            return True
        if content_hash in self._block_of:
            return False
        self._hash_of[block] = content_hash
        self._block_of[content_hash] = block
        return True

    def check_integrity(self) -> None:
        """Raise `KVIntegrityError` naming the first broken invariant; O(num_blocks)."""
        def fail(msg: str) -> None:
            raise KVIntegrityError(f"{self._where}: {msg}")

        if self._refs[NULL_BLOCK] != 0 or NULL_BLOCK in self._cached or NULL_BLOCK in self._hash_of:
            fail("the null block 0 was handed out or hashed")
        free = set(self._free)
        if len(free) != len(self._free):
            fail("a block appears twice on the free list")
        if NULL_BLOCK in free:
            fail("the null block 0 is on the free list")
        if free & self._cached.keys():
            fail(f"blocks both free and cached: {sorted(free & self._cached.keys())[:8]}")
        used = 0
        for block in range(1, self.num_blocks):
            ref = self._refs[block]
            if ref < 0:
                fail(f"block {block} has reference count {ref}")
            if ref > 0:
                used += 1
                if block in free or block in self._cached:
                    fail(f"block {block} is used (refs {ref}) and also free or cached")
            elif block not in free and block not in self._cached:
                fail(f"block {block} has no references but is neither free nor cached (leaked)")
        if used != self._num_used:
            fail(f"used counter {self._num_used} != {used} blocks with references")
        if len(free) + used + len(self._cached) != self.num_blocks - 1:
            fail(f"free {len(free)} + used {used} + cached {len(self._cached)} != {self.num_blocks - 1}")
        if len(self._hash_of) != len(self._block_of):
            fail("hash maps differ in size")
        for block, content_hash in self._hash_of.items():
            if self._block_of.get(content_hash) != block:
                fail(f"block {block} hash {content_hash:#x} does not map back to it")
            if block in free:
                fail(f"block {block} is on the free list with a hash")
        for block in self._cached:
            if block not in self._hash_of:
                fail(f"cached block {block} has no hash")
