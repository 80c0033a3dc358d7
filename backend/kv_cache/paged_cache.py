"""One model copy's KV cache: the page tensors (`KVStorage`) and their block accounting
(`KVCacheManager`), joined so that block ids handed out are the pages written.

Admission reserves every block a request can reach (prompt + max_tokens): a running request
never allocates, so a decode step can never fail for memory and nothing needs preempting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ModelConfig
from .layout import BLOCK_TOKENS, COMPRESSED_KINDS, FIXED_KINDS, KINDS, KVLayout, StorageFormat
from .manager import KVCacheManager, chain_hashes
from .storage import KVStorage, SequenceState

_FORMAT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
KV_FORMATS = {"float": ("float", "float"), "fp8": ("main_fp8", "index_fp8"), "fp8-fp4": ("main_fp8", "index_fp4")}


def layout_for(cfg: ModelConfig, dtype: torch.dtype, kv_format: str = "float") -> KVLayout:
    """Byte accounting for the pools `KVStorage` allocates in this format."""
    main, index = KV_FORMATS[kv_format]
    name = _FORMAT[dtype]
    return KVLayout.from_config(cfg, StorageFormat.named(cfg, main=name if main == "float" else "fp8",
                                                         index=name if index == "float" else index[len("index_"):]))


class PagedCache:
    def __init__(self, cfg: ModelConfig, manager: KVCacheManager, dtype: torch.dtype, device: torch.device | str = "cpu",
                 kv_format: str = "float"):
        """`kv_format`: "float" (pages in `dtype`), "fp8" (584-byte main entries, 132-byte index keys)
        or "fp8-fp4" (68-byte FP4 index keys)."""
        self.cfg, self.manager = cfg, manager
        sizes = {kind: pool.num_blocks for kind, pool in manager.pools.items()}
        main, index = KV_FORMATS[kv_format]
        self.storage = KVStorage(cfg, sizes, dtype, device, main_format=main, index_format=index)
        self.seqs: dict[str, SequenceState] = {}

    @classmethod
    def for_requests(cls, cfg: ModelConfig, dtype: torch.dtype, device, num_requests: int, max_positions: int,
                     snapshots: int = 0, kv_format: str = "float") -> PagedCache:
        """Exactly enough blocks for `num_requests` requests of `max_positions` (plus snapshot slots)."""
        layout = layout_for(cfg, dtype, kv_format)
        need = layout.blocks_for_tokens(max_positions)._asdict()
        sizes = {k: need[k] * (num_requests + (snapshots if k in FIXED_KINDS else 0)) + 1 for k in layout.present}
        return cls(cfg, KVCacheManager(layout, sizes), dtype, device, kv_format)

    @classmethod
    def from_budget(cls, cfg: ModelConfig, dtype: torch.dtype, device, budget_bytes: int, max_model_len: int,
                    max_num_seqs: int | None = None, snapshots: int = 0, kv_format: str = "float") -> PagedCache:
        """Pools sized once from a byte budget (see `KVCacheManager.from_budget` for the split)."""
        manager = KVCacheManager.from_budget(layout_for(cfg, dtype, kv_format), budget_bytes, max_model_len,
                                             max_num_seqs=max_num_seqs, snapshot_slots=snapshots)
        return cls(cfg, manager, dtype, device, kv_format)

    @property
    def layout(self) -> KVLayout:
        return self.manager.layout

    def can_admit(self, num_tokens: int, hashes: Sequence[int] = (), prompt_len: int | None = None) -> bool:
        return self.manager.can_admit(num_tokens, hashes, prompt_len)

    def admit(self, rid: str, num_tokens: int, hashes: Sequence[int] = (), prompt_len: int | None = None) -> SequenceState:
        """Reserve blocks for `num_tokens` positions; on a prefix hit, resume at the cached boundary.

        Raises `OutOfBlocksError` when the pools cannot hold the request now.
        """
        cached = self.manager.admit_with_prefix(rid, num_tokens, hashes, prompt_len)
        rb = self.manager.blocks(rid)
        seq = SequenceState(ring_block=rb.swa[0], state_block=rb.state[0] if rb.state else 0, position=cached,
                            csa_blocks=rb.csa_kv, csa_index_blocks=rb.csa_index, hca_blocks=rb.hca_kv)
        snapshot = rb.restored_from
        if snapshot is not None:
            # copy before the next manager call: the snapshot's ids are evictable again afterwards
            self.storage.copy_block("swa", snapshot.swa, seq.ring_block)
            if snapshot.state is not None:
                self.storage.copy_block("state", snapshot.state, seq.state_block)
        elif rb.state:
            self.storage.reset_state(seq.state_block)
        self.seqs[rid] = seq
        return seq

    def save_snapshot(self, rid: str, hashes: Sequence[int]) -> bool:
        """At a block boundary (seq.position = 256 n): publish blocks 0..n-1 and keep ring + state."""
        seq = self.seqs[rid]
        boundary = seq.position // BLOCK_TOKENS
        if seq.position % BLOCK_TOKENS or boundary < 1 or boundary > len(hashes):
            raise ValueError(f"request {rid!r} at position {seq.position} is not at a hashed block boundary")
        self.manager.register_blocks(rid, hashes[:boundary])
        snapshot = self.manager.save_snapshot(rid, boundary, hashes[boundary - 1])
        if snapshot is None:
            return False
        self.storage.copy_block("swa", seq.ring_block, snapshot.swa)
        if snapshot.state is not None:
            self.storage.copy_block("state", seq.state_block, snapshot.state)
        return True

    def publish(self, rid: str, hashes: Sequence[int]) -> None:
        """Name every fully written compressed block so later prompts can share it."""
        seq = self.seqs[rid]
        self.manager.register_blocks(rid, hashes[: seq.position // BLOCK_TOKENS])

    def release(self, rid: str) -> None:
        del self.seqs[rid]
        self.manager.free(rid)

    def blocks_in_use(self) -> dict[str, int]:
        return {kind: usage.used for kind, usage in self.manager.usage().items()}

    def bytes_held(self, rid: str) -> int:
        return self.manager.bytes_held(rid)


__all__ = ["PagedCache", "chain_hashes", "layout_for", "KINDS", "COMPRESSED_KINDS"]
