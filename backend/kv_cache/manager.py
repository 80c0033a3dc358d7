"""Per-request block tables over one `BlockPool` per cache kind, with exact admission and prefix caching."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .block_pool import BlockPool, KVIntegrityError, OutOfBlocksError
from .layout import BLOCK_TOKENS, COMPRESSED_KINDS, FIXED_KINDS, KINDS, KindCounts, KVLayout

_TOKEN_DTYPE = np.dtype("<i8")  # a block hashes its tokens as 256 little-endian int64
_ROOT_HASH = 0


class Snapshot(NamedTuple):
    """Block ids holding a copy of the ring (`swa`) and the accumulators (`state`) at a block boundary."""

    swa: int
    state: int | None


class Readmission(NamedTuple):
    """What a preempted request needs to come back: its reservation and its registered block hashes."""

    num_tokens: int
    hashes: tuple[int, ...]


class KindUsage(NamedTuple):
    """Blocks of one kind: `total` allocatable ids (null excluded); bytes include the null page."""

    used: int
    cached: int
    free: int
    total: int
    used_bytes: int
    total_bytes: int


@dataclass(slots=True)
class RequestBlocks:
    """The block tables of one live request; the manager owns it, callers only read it.

    One list per kind: `swa` and `state` hold exactly one block (when the kind is present);
    entry j of a compressed kind covers positions 256j .. 256j+255. The first
    `num_cached_tokens // 256` compressed blocks may be shared with other requests (refcounted).
    `restored_from` is the snapshot a prefix hit resumes from: copy it into `swa[0]` / `state[0]`
    before the next call into the manager, after which its ids may be reused.
    """

    num_tokens: int
    swa: list[int] = field(default_factory=list)
    csa_kv: list[int] = field(default_factory=list)
    csa_index: list[int] = field(default_factory=list)
    hca_kv: list[int] = field(default_factory=list)
    state: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    hashes: list[int] = field(default_factory=list)
    restored_from: Snapshot | None = None

    def table(self, kind: str) -> list[int]:
        if kind not in KINDS:
            raise KeyError(f"unknown cache kind {kind!r}")
        return getattr(self, kind)


class _Plan(NamedTuple):
    cached_blocks: int
    shared: dict[str, list[int]]
    snapshot: Snapshot | None
    fresh: KindCounts
    fits: bool


def chain_hashes(token_ids: Sequence[int] | np.ndarray) -> list[int]:
    """Chained 64-bit hashes of the full 256-token blocks: h_j = blake2b(h_{j-1}, tokens of block j as
    little-endian int64). The tokens are converted once with numpy: packing them block by block from
    Python ints held the GIL ~6 ms for a 128K-token prompt (50 ms at 1M), stalling a decode loop
    beside it; a block's 2 KiB are hashed with the GIL released."""
    n = len(token_ids) // BLOCK_TOKENS
    data = np.asarray(token_ids[: n * BLOCK_TOKENS], dtype=_TOKEN_DTYPE).tobytes()
    out, prev, step = [], _ROOT_HASH, BLOCK_TOKENS * _TOKEN_DTYPE.itemsize
    for j in range(n):
        digest = hashlib.blake2b(prev.to_bytes(8, "little"), digest_size=8)
        digest.update(data[j * step : (j + 1) * step])
        prev = int.from_bytes(digest.digest(), "little")
        out.append(prev)
    return out


def snapshot_boundaries(prompt_len: int, interval: int = 0) -> list[int]:
    """Cache points of a prompt, in blocks: every `interval` blocks and the last full block before its final token."""
    last = (prompt_len - 1) // BLOCK_TOKENS if prompt_len > 0 else 0
    points = set(range(interval, last + 1, interval)) if interval > 0 else set()
    if last > 0:
        points.add(last)
    return sorted(points)


class KVCacheManager:
    """Owns one `BlockPool` per present cache kind and the block tables of every live request.

    Invariants (`check_integrity`): each used block's reference count equals the number of table
    entries naming it (tables share only prefix-cached compressed blocks), no table names the
    null block or a freed block, and every pool is consistent. Admission reserves exactly the
    blocks for `num_tokens` positions (prompt + max_tokens), so a running request never allocates.
    Snapshots live as hashed, unreferenced blocks in the `swa` / `state` pools: evictable in LRU
    order like freed compressed blocks. Not thread-safe: one scheduler thread calls it.
    """

    chain_hashes = staticmethod(chain_hashes)

    def __init__(self, layout: KVLayout, num_blocks: KindCounts | Mapping[str, int]) -> None:
        sizes = num_blocks._asdict() if isinstance(num_blocks, KindCounts) else dict(num_blocks)
        self.layout = layout
        self.pools: dict[str, BlockPool] = {}
        for kind in layout.present:
            if kind not in sizes:
                raise ValueError(f"no pool size given for cache kind {kind!r}")
            self.pools[kind] = BlockPool(sizes[kind], kind)
        self._block_bytes = layout.block_bytes._asdict()
        self._requests: dict[str, RequestBlocks] = {}
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.prefix_hit_tokens = 0

    @classmethod
    def from_budget(
        cls,
        layout: KVLayout,
        budget_bytes: int,
        max_model_len: int,
        *,
        max_num_seqs: int | None = None,
        snapshot_slots: int | None = None,
    ) -> KVCacheManager:
        """Size the pools from a byte budget.

        Rule: let d_k be the blocks of kind k one request of `max_model_len` positions needs,
        B_k a block's bytes, F the fixed (swa + state) and G the growing (compressed) bytes of
        that request. The null page of every pool is paid first. The fixed pools get one block
        per request slot plus one per snapshot slot; with `max_num_seqs` unset the request slots
        are as many max-length requests as fit, each charged with its own snapshot slot
        (budget // (G + 2F)); `snapshot_slots` defaults to the request slots. The rest of the
        budget is split between the compressed pools in proportion to d_k * B_k, so they run out
        together when every request is max_model_len long. Every pool holds at least one
        max-length request, else ValueError.
        """
        if max_model_len < 1:
            raise ValueError(f"max_model_len = {max_model_len}: must be >= 1")
        demand = layout.blocks_for_tokens(max_model_len)._asdict()
        bb = layout.block_bytes._asdict()
        fixed = sum(demand[k] * bb[k] for k in FIXED_KINDS)
        growing = sum(demand[k] * bb[k] for k in COMPRESSED_KINDS)
        avail = budget_bytes - sum(bb[k] for k in layout.present)
        if max_num_seqs is None:
            per_seq = growing + fixed * (1 if snapshot_slots is not None else 2)
            max_num_seqs = max(0, avail - fixed * (snapshot_slots or 0)) // per_seq
        snaps = max_num_seqs if snapshot_slots is None else snapshot_slots
        rest = avail - (max_num_seqs + snaps) * fixed
        if max_num_seqs < 1 or snaps < 0 or rest < growing:
            need = growing + fixed * 2 + sum(bb[k] for k in layout.present)
            raise ValueError(
                f"KV budget of {budget_bytes} B cannot hold one request of max_model_len={max_model_len} "
                f"positions with {max_num_seqs} request slot(s) and {snaps} snapshot slot(s) "
                f"(one request with one snapshot slot needs {need} B)"
            )
        sizes = {}
        for kind in layout.present:
            if kind in FIXED_KINDS:
                usable = (max_num_seqs + snaps) * demand[kind]
            else:
                usable = rest * demand[kind] // growing if growing else 0
            sizes[kind] = usable + 1
        return cls(layout, sizes)

    def _limit(self, num_hashes: int, num_tokens: int, prompt_len: int | None) -> int:
        # at least one position must still run (to produce logits), so the boundary is strictly before the end
        limit = min(num_hashes, (num_tokens - 1) // BLOCK_TOKENS)
        if prompt_len is not None:
            limit = min(limit, (prompt_len - 1) // BLOCK_TOKENS)
        return max(limit, 0)

    def _cached_run(self, hashes: Sequence[int], limit: int) -> int:
        compressed = [p for k, p in self.pools.items() if k in COMPRESSED_KINDS]
        for j in range(limit):
            if any(p.peek(hashes[j]) is None for p in compressed):
                return j
        return limit

    def match_prefix(self, hashes: Sequence[int], prompt_len: int | None = None) -> int:
        """Longest n with compressed blocks 0..n-1 cached and a snapshot at boundary n (a query: counts nothing).

        Only boundaries strictly before the prompt's last token count: pass `prompt_len`, or
        hashes of at most the full blocks of `prompt[:-1]`.
        """
        limit = len(hashes) if prompt_len is None else self._limit(len(hashes), prompt_len, None)
        for n in range(self._cached_run(hashes, limit), 0, -1):
            if self.snapshot_for(hashes[n - 1]) is not None:
                return n
        return 0

    def _plan(self, num_tokens: int, hashes: Sequence[int], prompt_len: int | None) -> _Plan:
        if num_tokens < 1:
            raise ValueError(f"num_tokens = {num_tokens}: a request spans at least one position")
        need = self.layout.blocks_for_tokens(num_tokens)._asdict()
        limit = self._limit(len(hashes), num_tokens, prompt_len)
        n = self.match_prefix(hashes[:limit]) if limit else 0
        snapshot = self.snapshot_for(hashes[n - 1]) if n else None
        shared = {k: [p.peek(h) for h in hashes[:n]] for k, p in self.pools.items() if k in COMPRESSED_KINDS}
        fresh = {k: need[k] - len(shared.get(k, ())) for k in KINDS}
        fits = True
        for kind, pool in self.pools.items():
            pinned = list(shared.get(kind, ()))
            if snapshot is not None and kind in FIXED_KINDS:
                pinned.append(snapshot._asdict()[kind])
            revived = sum(1 for b in pinned if pool.refcount(b) == 0)
            fits = fits and fresh[kind] + revived <= pool.num_free
        return _Plan(n, shared, snapshot, KindCounts(**fresh), fits)

    def can_admit(self, num_tokens: int, hashes: Sequence[int] = (), prompt_len: int | None = None) -> bool:
        """Whether `admit` (or `admit_with_prefix` with these hashes) would succeed now."""
        if self._plan(num_tokens, (), None).fits:
            return True
        return bool(hashes) and self._plan(num_tokens, hashes, prompt_len).fits

    def admit(self, request_id: str, num_tokens: int) -> RequestBlocks:
        """Reserve every block a request of `num_tokens` positions will need (no prefix reuse)."""
        self.admit_with_prefix(request_id, num_tokens, ())
        return self._requests[request_id]

    def admit_with_prefix(
        self, request_id: str, num_tokens: int, hashes: Sequence[int], prompt_len: int | None = None
    ) -> int:
        """Admit reusing the longest cached prefix of `hashes`; returns the cached positions (256 n).

        Shared compressed blocks are incref'd, the snapshot is pinned while the fresh blocks are
        allocated (so they never reuse its ids), everything else is allocated fresh. If the
        prefix plan does not fit but a cold admission does, the request is admitted cold.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already admitted")
        plan = self._plan(num_tokens, hashes, prompt_len)
        if not plan.fits and plan.cached_blocks:
            plan = self._plan(num_tokens, (), None)
        if not plan.fits:
            short = [(k, p.num_free) for k, p in self.pools.items() if plan.fresh._asdict()[k] > p.num_free]
            kind, free = short[0] if short else ("?", 0)
            raise OutOfBlocksError(kind, plan.fresh._asdict().get(kind, 0), free)
        if self._limit(len(hashes), num_tokens, prompt_len):
            if plan.cached_blocks:
                self.prefix_hits += 1
                self.prefix_hit_tokens += plan.cached_blocks * BLOCK_TOKENS
            else:
                self.prefix_misses += 1
        n = plan.cached_blocks
        rb = RequestBlocks(num_tokens, num_cached_tokens=n * BLOCK_TOKENS, hashes=list(hashes[:n]))
        rb.restored_from = plan.snapshot
        pins = plan.snapshot._asdict() if plan.snapshot is not None else {}
        for kind, pool in self.pools.items():
            if kind in plan.shared:
                ids = [pool.lookup(h) for h in hashes[:n]]
                pool.incref(ids)
                rb.table(kind).extend(ids)
            if pins.get(kind) is not None:
                pool.incref([pins[kind]])
            rb.table(kind).extend(pool.allocate(plan.fresh._asdict()[kind]))
        for kind, pool in self.pools.items():
            if pins.get(kind) is not None:
                pool.free([pins[kind]])
        self._requests[request_id] = rb
        return n * BLOCK_TOKENS

    def blocks(self, request_id: str) -> RequestBlocks:
        rb = self._requests.get(request_id)
        if rb is None:
            raise KeyError(f"request {request_id!r} holds no KV blocks (never admitted, or already freed)")
        return rb

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def free(self, request_id: str) -> None:
        """Release every block of a request (finished or cancelled); a second free raises KeyError."""
        rb = self.blocks(request_id)
        del self._requests[request_id]
        for kind, pool in self.pools.items():
            # tail first, so the LRU evicts the end of a hashed chain before its (more shared) head
            pool.free(reversed(rb.table(kind)))

    def preempt(self, request_id: str) -> Readmission:
        """Free a running request; re-admit it with `admit_with_prefix(id, *readmission)` later."""
        rb = self.blocks(request_id)
        out = Readmission(rb.num_tokens, tuple(rb.hashes))
        self.free(request_id)
        return out

    def bytes_held(self, request_id: str) -> int:
        """Bytes of every block the request's tables name, shared blocks included."""
        rb = self.blocks(request_id)
        return sum(len(rb.table(k)) * self._block_bytes[k] for k in self.pools)

    def usage(self) -> dict[str, KindUsage]:
        out = {}
        for kind, pool in self.pools.items():
            bb = self._block_bytes[kind]
            out[kind] = KindUsage(
                pool.num_used, pool.num_cached, pool.num_free, pool.num_blocks - 1,
                pool.num_used * bb, pool.num_blocks * bb,
            )
        return out

    def register_blocks(self, request_id: str, hashes: Sequence[int]) -> int:
        """Name the request's compressed blocks 0..len(hashes)-1 (written by now) for prefix reuse."""
        rb = self.blocks(request_id)
        if len(hashes) * BLOCK_TOKENS > rb.num_tokens:
            raise ValueError(
                f"request {request_id!r}: {len(hashes)} block hashes exceed its {rb.num_tokens} reserved positions"
            )
        done = len(rb.hashes)
        if list(hashes[:done]) != rb.hashes[: len(hashes)]:
            raise ValueError(f"request {request_id!r}: hashes disagree with the ones registered before")
        for kind, pool in self.pools.items():
            if kind in COMPRESSED_KINDS:
                table = rb.table(kind)
                for j in range(done, len(hashes)):
                    pool.set_hash(table[j], hashes[j])
        if len(hashes) > done:
            rb.hashes = list(hashes)
        return len(rb.hashes)

    def snapshot_for(self, content_hash: int) -> Snapshot | None:
        """The snapshot saved under `content_hash` (the hash of the block before its boundary), if kept."""
        swa = self.pools["swa"].peek(content_hash)
        state_pool = self.pools.get("state")
        state = state_pool.peek(content_hash) if state_pool is not None else None
        if swa is None or (state_pool is not None and state is None):
            return None
        return Snapshot(swa, state)

    def save_snapshot(self, request_id: str, boundary_block: int, content_hash: int) -> Snapshot | None:
        """Reserve a snapshot of the request's ring and accumulators at position 256 * boundary_block.

        Returns the ids to copy `swa[0]` / `state[0]` into (before the next call into the manager),
        or None when that snapshot is already kept or no block can be had. The snapshot is keyed by
        the chained hash of block boundary_block - 1 and is evictable at once (LRU).
        """
        rb = self.blocks(request_id)
        if boundary_block < 1 or boundary_block * BLOCK_TOKENS > rb.num_tokens:
            raise ValueError(
                f"request {request_id!r}: boundary block {boundary_block} is outside its {rb.num_tokens} positions"
            )
        if boundary_block <= len(rb.hashes) and rb.hashes[boundary_block - 1] != content_hash:
            raise ValueError(f"request {request_id!r}: hash does not match registered block {boundary_block - 1}")
        if self.snapshot_for(content_hash) is not None:
            return None
        fixed = [(k, p) for k, p in self.pools.items() if k in FIXED_KINDS]
        if any(p.peek(content_hash) is None and p.num_free < 1 for _, p in fixed):
            return None
        ids = {}
        for kind, pool in fixed:
            kept = pool.peek(content_hash)
            if kept is not None:
                pool.incref([kept])
                ids[kind] = kept
            else:
                ids[kind] = pool.allocate(1)[0]
                pool.set_hash(ids[kind], content_hash)
        for kind, pool in fixed:
            pool.free([ids[kind]])
        return Snapshot(ids["swa"], ids.get("state"))

    def check_integrity(self) -> None:
        """Every pool consistent and each used block's reference count equal to its table references."""
        for kind, pool in self.pools.items():
            pool.check_integrity()
            refs: dict[int, int] = {}
            for request_id, rb in self._requests.items():
                table = rb.table(kind)
                if len(set(table)) != len(table):
                    raise KVIntegrityError(f"{kind}: request {request_id!r} names a block twice: {table}")
                for block in table:
                    if not 0 < block < pool.num_blocks:
                        raise KVIntegrityError(f"{kind}: request {request_id!r} holds invalid block id {block}")
                    refs[block] = refs.get(block, 0) + 1
            for block, count in refs.items():
                if pool.refcount(block) != count:
                    held = pool.refcount(block)
                    raise KVIntegrityError(f"{kind}: block {block} is in {count} table(s) but has {held} references")
            if len(refs) != pool.num_used:
                raise KVIntegrityError(f"{kind}: {pool.num_used} blocks used but {len(refs)} named by tables")
        for request_id, rb in self._requests.items():
            need = self.layout.blocks_for_tokens(rb.num_tokens)._asdict()
            for kind in self.pools:
                if len(rb.table(kind)) != need[kind]:
                    raise KVIntegrityError(
                        f"request {request_id!r}: {kind} table has {len(rb.table(kind))} blocks, needs {need[kind]}"
                    )
