from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsv4.backend.kv_cache.block_pool import KVIntegrityError, OutOfBlocksError
from dsv4.backend.kv_cache.layout import COMPRESSED_KINDS, KINDS, KVLayout
from dsv4.backend.kv_cache.manager import KVCacheManager, Snapshot, chain_hashes, snapshot_boundaries
from dsv4.backend.presets import preset

GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny_layout():
    return KVLayout.from_config(preset("tiny"))


def _manager(layout, swa=9, compressed=17, state=9):
    sizes = {"swa": swa, "csa_kv": compressed, "csa_index": compressed, "hca_kv": compressed, "state": state}
    return KVCacheManager(layout, sizes)


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(129280) for _ in range(n)]


def test_chain_hashes_are_chained_and_stable():
    a = _tokens(0, 1000)
    b = list(a)
    b[5] += 1
    ha, hb = chain_hashes(a), chain_hashes(b)
    assert len(ha) == 3 and ha == chain_hashes(a) == KVCacheManager.chain_hashes(a[:800])
    # a change in block 0 changes every later hash
    assert all(x != y for x, y in zip(ha, hb))
    assert chain_hashes(a[:255]) == []
    assert all(0 <= h < 1 << 64 for h in ha)


def test_chain_hashes_are_the_defined_blake2b_chain_for_lists_and_arrays():
    """h_j = blake2b(h_{j-1} as 8 little-endian bytes || block j's tokens as little-endian int64), from 0."""
    import hashlib
    import struct

    import numpy as np

    a = _tokens(3, 256 * 5 + 17)
    want, prev = [], 0
    for j in range(5):
        digest = hashlib.blake2b(prev.to_bytes(8, "little"), digest_size=8)
        digest.update(struct.pack("<256q", *a[j * 256 : (j + 1) * 256]))
        prev = int.from_bytes(digest.digest(), "little")
        want.append(prev)
    assert chain_hashes(a) == want
    assert chain_hashes(np.asarray(a, dtype=np.int32)) == want


def test_snapshot_boundaries():
    assert snapshot_boundaries(256) == []
    assert snapshot_boundaries(257) == [1]
    assert snapshot_boundaries(1000) == [3]
    assert snapshot_boundaries(3000, interval=4) == [4, 8, 11]


def test_admit_reserves_exactly(tiny_layout):
    mgr = _manager(tiny_layout)
    rb = mgr.admit("a", 1000)
    need = tiny_layout.blocks_for_tokens(1000)
    assert tuple(len(rb.table(k)) for k in KINDS) == tuple(need)
    assert mgr.bytes_held("a") == tiny_layout.request_bytes(1000).total
    assert mgr.usage()["csa_kv"].used == need.csa_kv
    mgr.check_integrity()


def test_can_admit_is_exact(tiny_layout):
    mgr = _manager(tiny_layout, compressed=9)
    # 1024 positions need 4 csa blocks: two requests fill 8 usable blocks exactly
    assert mgr.can_admit(1024)
    mgr.admit("a", 1024)
    mgr.admit("b", 1024)
    # 3 positions complete no compressed entry; 4 complete one, which needs a csa block
    assert mgr.can_admit(3) and not mgr.can_admit(4)
    with pytest.raises(OutOfBlocksError, match="csa"):
        mgr.admit("c", 4)
    assert mgr.num_requests == 2
    mgr.check_integrity()


def test_free_errors(tiny_layout):
    mgr = _manager(tiny_layout)
    with pytest.raises(KeyError, match="never admitted"):
        mgr.free("nope")
    mgr.admit("a", 10)
    with pytest.raises(ValueError, match="already admitted"):
        mgr.admit("a", 10)
    mgr.free("a")
    with pytest.raises(KeyError, match="already freed"):
        mgr.free("a")
    with pytest.raises(ValueError, match="num_tokens"):
        mgr.admit("b", 0)
    assert all(u.used == 0 for u in mgr.usage().values())


def test_prefix_hit_shares_blocks_and_restores_snapshot(tiny_layout):
    mgr = _manager(tiny_layout)
    prompt = _tokens(1, 1000)
    hashes = chain_hashes(prompt)
    assert mgr.admit_with_prefix("a", 1100, hashes, prompt_len=1000) == 0
    assert mgr.prefix_misses == 1
    mgr.register_blocks("a", hashes)
    snap = mgr.save_snapshot("a", 3, hashes[2])
    assert isinstance(snap, Snapshot)
    assert mgr.save_snapshot("a", 3, hashes[2]) is None
    a_blocks = {k: list(mgr.blocks("a").table(k)) for k in COMPRESSED_KINDS}
    assert mgr.match_prefix(hashes) == 3
    assert mgr.match_prefix(hashes, prompt_len=768) == 0
    # a's blocks are shared while a is alive ...
    assert mgr.admit_with_prefix("b", 1200, hashes, prompt_len=1000) == 768
    rb = mgr.blocks("b")
    assert rb.restored_from == snap and rb.num_cached_tokens == 768
    assert rb.swa[0] != snap.swa and rb.state[0] != snap.state
    for kind in COMPRESSED_KINDS:
        assert rb.table(kind)[:3] == a_blocks[kind][:3]
        assert mgr.pools[kind].refcount(a_blocks[kind][0]) == 2
    mgr.check_integrity()
    # ... and found again after both are freed
    mgr.free("a")
    mgr.free("b")
    assert mgr.admit_with_prefix("c", 1000 + 50, hashes + [123], prompt_len=1000) == 768
    assert (mgr.prefix_hits, mgr.prefix_misses, mgr.prefix_hit_tokens) == (2, 1, 1536)
    mgr.free("c")
    mgr.check_integrity()
    assert all(u.used == 0 for u in mgr.usage().values())


def test_prefix_needs_snapshot_at_boundary(tiny_layout):
    mgr = _manager(tiny_layout)
    prompt = _tokens(2, 1000)
    hashes = chain_hashes(prompt)
    mgr.admit("a", 1000)
    mgr.register_blocks("a", hashes)
    mgr.save_snapshot("a", 1, hashes[0])
    assert mgr.match_prefix(hashes) == 1
    with pytest.raises(ValueError, match="does not match"):
        mgr.save_snapshot("a", 2, hashes[0])
    with pytest.raises(ValueError, match="outside"):
        mgr.save_snapshot("a", 4, 5)
    with pytest.raises(ValueError, match="disagree"):
        mgr.register_blocks("a", [1, 2])


def test_snapshots_evict_lru(tiny_layout):
    # 2 usable swa blocks: one live ring leaves room for one snapshot
    mgr = _manager(tiny_layout, swa=3, state=3)
    hashes = chain_hashes(_tokens(3, 800))
    mgr.admit("a", 800)
    mgr.register_blocks("a", hashes)
    assert mgr.save_snapshot("a", 1, hashes[0]) is not None
    assert mgr.save_snapshot("a", 2, hashes[1]) is not None
    assert mgr.snapshot_for(hashes[0]) is None and mgr.snapshot_for(hashes[1]) is not None
    # a new request's ring evicts the only snapshot; with nothing allocatable a snapshot is skipped
    mgr.admit("b", 10)
    assert mgr.snapshot_for(hashes[1]) is None
    assert mgr.save_snapshot("a", 3, hashes[2]) is None
    mgr.check_integrity()


def test_prefix_plan_falls_back_to_cold(tiny_layout):
    # 2 usable swa blocks
    mgr = _manager(tiny_layout, swa=3, state=3)
    hashes = chain_hashes(_tokens(4, 600))
    mgr.admit("a", 600)
    mgr.register_blocks("a", hashes)
    mgr.save_snapshot("a", 2, hashes[1])
    mgr.free("a")
    mgr.admit("x", 1)
    # the only allocatable swa block is the snapshot: the hit would need it plus a fresh ring
    assert mgr.match_prefix(hashes, 600) == 2
    assert mgr.can_admit(600, hashes, prompt_len=600)
    assert mgr.admit_with_prefix("b", 600, hashes, prompt_len=600) == 0
    assert mgr.snapshot_for(hashes[1]) is None
    assert mgr.prefix_misses == 1
    mgr.check_integrity()


def test_preempt_and_readmit(tiny_layout):
    mgr = _manager(tiny_layout)
    hashes = chain_hashes(_tokens(5, 900))
    mgr.admit("a", 950)
    mgr.register_blocks("a", hashes)
    mgr.save_snapshot("a", 3, hashes[2])
    readmit = mgr.preempt("a")
    assert readmit.num_tokens == 950 and readmit.hashes == tuple(hashes)
    assert "a" not in mgr
    assert mgr.admit_with_prefix("a", *readmit) == 768
    mgr.check_integrity()


def test_from_budget_rule(tiny_layout):
    max_len = 4096
    d = tiny_layout.blocks_for_tokens(max_len)
    bb = tiny_layout.block_bytes
    per_request = tiny_layout.request_bytes(max_len).total
    fixed = d.swa * bb.swa + d.state * bb.state
    budget = 10 * per_request
    mgr = KVCacheManager.from_budget(tiny_layout, budget, max_len)
    total = sum(u.total_bytes for u in mgr.usage().values())
    assert total <= budget
    seqs = (budget - sum(bb)) // (per_request + fixed)
    assert mgr.usage()["swa"].total == 2 * seqs
    for kind in COMPRESSED_KINDS:
        usable = mgr.usage()[kind].total
        assert usable >= seqs * getattr(d, kind)
    # the compressed pools run out together for max-length requests
    fits = [mgr.usage()[k].total // getattr(d, k) for k in COMPRESSED_KINDS]
    assert max(fits) - min(fits) <= 1
    n = 0
    while mgr.can_admit(max_len):
        mgr.admit(str(n), max_len)
        n += 1
    assert n >= seqs
    with pytest.raises(ValueError, match="cannot hold one request"):
        KVCacheManager.from_budget(tiny_layout, per_request // 2, max_len)
    custom = KVCacheManager.from_budget(tiny_layout, budget, max_len, max_num_seqs=20, snapshot_slots=0)
    assert custom.usage()["state"].total == 20


def test_integrity_detects_foreign_block(tiny_layout):
    mgr = _manager(tiny_layout)
    mgr.admit("a", 300)
    mgr.admit("b", 300)
    mgr.blocks("b").csa_kv[0] = mgr.blocks("a").csa_kv[0]
    with pytest.raises(KVIntegrityError, match="csa_kv"):
        mgr.check_integrity()


PROMPTS = [_tokens(10 + i, 1400) for i in range(3)]
PROMPT_HASHES = [chain_hashes(p) for p in PROMPTS]


class ManagerMachine(RuleBasedStateMachine):
    """Random admit / prefix admit / register / snapshot / free / cancel / preempt sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.layout = KVLayout.from_config(preset("tiny"))
        self.mgr = _manager(self.layout, swa=12, compressed=25, state=12)
        self.prompt: dict[str, tuple[int, int]] = {}
        self.gone: list[str] = []
        self.next_id = 0

    @rule(base=st.integers(0, 2), prompt_len=st.integers(1, 1300), extra=st.integers(0, 200), use_prefix=st.booleans())
    def admit(self, base: int, prompt_len: int, extra: int, use_prefix: bool) -> None:
        self.next_id += 1
        rid, total = f"r{self.next_id}", prompt_len + extra
        hashes = PROMPT_HASHES[base][: prompt_len // 256] if use_prefix else []
        expected = self.mgr.match_prefix(hashes, prompt_len)
        if not self.mgr.can_admit(total, hashes, prompt_len):
            with pytest.raises(OutOfBlocksError):
                self.mgr.admit_with_prefix(rid, total, hashes, prompt_len)
            event("admission refused")
            return
        cached = self.mgr.admit_with_prefix(rid, total, hashes, prompt_len)
        event("prefix hit" if cached else "cold")
        assert cached in (0, expected * 256) and cached < prompt_len
        rb = self.mgr.blocks(rid)
        for kind in COMPRESSED_KINDS:
            for j in range(cached // 256):
                assert self.mgr.pools[kind].peek(hashes[j]) == rb.table(kind)[j]
        self.prompt[rid] = (base, prompt_len)

    @precondition(lambda self: self.prompt)
    @rule(data=st.data())
    def register_and_snapshot(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.prompt)))
        base, prompt_len = self.prompt[rid]
        rb = self.mgr.blocks(rid)
        upto = data.draw(st.integers(len(rb.hashes), min(prompt_len, rb.num_tokens) // 256))
        hashes = PROMPT_HASHES[base][:upto]
        assert self.mgr.register_blocks(rid, hashes) == upto
        if upto:
            boundary = data.draw(st.integers(1, upto))
            snap = self.mgr.save_snapshot(rid, boundary, hashes[boundary - 1])
            if snap is not None:
                assert self.mgr.snapshot_for(hashes[boundary - 1]) == snap

    @precondition(lambda self: self.prompt)
    @rule(data=st.data(), how=st.sampled_from(["finish", "cancel", "preempt"]))
    def release(self, data: st.DataObject, how: str) -> None:
        rid = data.draw(st.sampled_from(sorted(self.prompt)))
        base, prompt_len = self.prompt[rid]
        if how == "preempt":
            readmit = self.mgr.preempt(rid)
            assert readmit.num_tokens > 0 and list(readmit.hashes) == PROMPT_HASHES[base][: len(readmit.hashes)]
        else:
            if how == "finish":
                # what the engine does once the prompt is written: name its blocks, snapshot the cache point
                rb = self.mgr.blocks(rid)
                hashes = PROMPT_HASHES[base][: min(prompt_len, rb.num_tokens) // 256]
                self.mgr.register_blocks(rid, hashes)
                for boundary in snapshot_boundaries(prompt_len):
                    self.mgr.save_snapshot(rid, boundary, hashes[boundary - 1])
            # a cancel frees mid-way, with whatever was registered so far
            self.mgr.free(rid)
        del self.prompt[rid]
        self.gone.append(rid)

    @precondition(lambda self: self.gone)
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        with pytest.raises(KeyError):
            self.mgr.free(data.draw(st.sampled_from(self.gone)))

    @invariant()
    def balanced(self) -> None:
        self.mgr.check_integrity()
        for kind, pool in self.mgr.pools.items():
            refs = Counter(b for rid in self.prompt for b in self.mgr.blocks(rid).table(kind))
            assert sum(refs.values()) == sum(pool.refcount(b) for b in range(pool.num_blocks))
            assert all(pool.refcount(b) == n for b, n in refs.items())
            assert pool.num_used + pool.num_free == pool.num_blocks - 1
        for rid in self.prompt:
            assert self.mgr.bytes_held(rid) == self.layout.request_bytes(self.mgr.blocks(rid).num_tokens).total

    def teardown(self) -> None:
        for rid in list(self.prompt):
            self.mgr.free(rid)
        assert all(u.used == 0 for u in self.mgr.usage().values())
        self.mgr.check_integrity()


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None, derandomize=True)


def test_to_device_keeps_values_and_dtype_on_the_cpu():
    import torch

    from dsv4.kernels.host_copy import to_device

    out = to_device([3, 1, 2**40], torch.int64, "cpu")
    assert out.tolist() == [3, 1, 2**40] and out.dtype == torch.int64
    assert to_device([], torch.int32, "cpu").shape == (0,)
