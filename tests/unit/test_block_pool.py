from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsv4.backend.kv_cache.block_pool import BlockPool, KVIntegrityError, OutOfBlocksError


def test_null_block_never_handed_out():
    pool = BlockPool(5, "swa")
    ids = pool.allocate(4)
    assert sorted(ids) == [1, 2, 3, 4]
    assert pool.num_free == 0 and pool.num_used == 4
    assert not pool.can_allocate(1)
    with pytest.raises(OutOfBlocksError, match="swa pool: asked for 1 blocks, only 0"):
        pool.allocate(1)
    pool.check_integrity()


def test_free_and_double_free():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.free([a])
    assert pool.num_used == 1 and pool.num_free == 2
    with pytest.raises(ValueError, match="double free"):
        pool.free([a])
    # a failed free changes nothing
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, b])
    assert pool.refcount(b) == 1
    with pytest.raises(ValueError, match="not an allocatable block id"):
        pool.free([0])
    pool.check_integrity()


def test_refcounts_share_a_block():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    pool.incref([a, a])
    assert pool.refcount(a) == 3
    pool.free([a, a])
    assert pool.num_used == 1
    pool.free([a])
    assert pool.num_used == 0
    with pytest.raises(ValueError, match="free"):
        pool.incref([a])


def test_cached_block_survives_until_needed_and_revives():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    assert pool.set_hash(a, 11) and pool.set_hash(b, 22)
    pool.free([c, a, b])
    # c had no hash: plain free; a then b are cached, a the least recently freed
    assert (pool.num_free, pool.num_cached) == (3, 2)
    assert pool.lookup(11) == a and pool.lookup(33) is None
    assert (pool.hits, pool.misses) == (1, 1)
    assert pool.allocate(1) == [c]
    pool.incref([b])
    assert pool.refcount(b) == 1 and pool.num_cached == 1
    # the only allocatable block now is cached a: allocation evicts it and drops its hash
    assert pool.allocate(1) == [a]
    assert pool.peek(11) is None and pool.evictions == 1
    assert pool.peek(22) == b
    pool.check_integrity()


def test_lru_evicts_least_recently_freed():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    for i, block in enumerate(ids):
        pool.set_hash(block, 100 + i)
    for block in (ids[2], ids[0], ids[1]):
        pool.free([block])
    assert pool.allocate(2) == [ids[2], ids[0]]
    assert pool.peek(101) == ids[1]


def test_set_hash_rules():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.set_hash(a, 7)
    assert pool.set_hash(a, 7)
    assert not pool.set_hash(b, 7)
    assert pool.hash_of(b) is None
    with pytest.raises(ValueError, match="already holds hash"):
        pool.set_hash(a, 8)
    pool.free([b])
    with pytest.raises(ValueError, match="not allocated"):
        pool.set_hash(b, 9)


def test_integrity_catches_corruption():
    pool = BlockPool(4, "hca_kv")
    (a,) = pool.allocate(1)
    pool._free.append(a)
    with pytest.raises(KVIntegrityError, match="hca_kv pool"):
        pool.check_integrity()
    pool = BlockPool(4)
    pool._refs[0] = 1
    with pytest.raises(KVIntegrityError, match="null block"):
        pool.check_integrity()


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
    with pytest.raises(ValueError, match="cannot allocate"):
        BlockPool(3).allocate(-1)
    assert BlockPool(1).num_free == 0


class PoolMachine(RuleBasedStateMachine):
    """The pool against a plain model: held references per id, and hashes of the blocks still findable."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(9, "test")
        self.held: list[int] = []
        self.hashes: dict[int, int] = {}

    @rule(n=st.integers(0, 4))
    def allocate(self, n: int) -> None:
        if n > self.pool.num_free:
            with pytest.raises(OutOfBlocksError):
                self.pool.allocate(n)
            return
        ids = self.pool.allocate(n)
        assert 0 not in ids and not set(ids) & set(self.held)
        for block in ids:
            for h in [h for h, b in self.hashes.items() if b == block]:
                del self.hashes[h]
        self.held += ids

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_one(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(self.held))
        self.held.remove(block)
        self.pool.free([block])

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(self.held))
        self.pool.incref([block])
        self.held.append(block)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), h=st.integers(0, 5))
    def name(self, data: st.DataObject, h: int) -> None:
        block = data.draw(st.sampled_from(self.held))
        current = self.pool.hash_of(block)
        if current is not None and current != h:
            with pytest.raises(ValueError):
                self.pool.set_hash(block, h)
        elif self.pool.set_hash(block, h):
            self.hashes[h] = block

    @rule(h=st.integers(0, 5))
    def hit(self, h: int) -> None:
        block = self.pool.lookup(h)
        assert block == self.hashes.get(h)
        if block is not None:
            self.pool.incref([block])
            self.held.append(block)

    @invariant()
    def consistent(self) -> None:
        self.pool.check_integrity()
        assert self.pool.num_used == len(set(self.held))
        assert sum(self.pool.refcount(b) for b in set(self.held)) == len(self.held)
        for h, block in self.hashes.items():
            assert self.pool.peek(h) == block

    def teardown(self) -> None:
        self.pool.free(self.held)
        assert self.pool.num_used == 0 and self.pool.num_free == 8
        self.pool.check_integrity()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, derandomize=True)
