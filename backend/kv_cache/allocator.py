"""Sequence-level allocation: hand a request its ring, state and compressed blocks up front.

`reserve` covers every position a request may reach (prompt + max_tokens), so a forward pass
never needs a block it does not hold.
"""

from __future__ import annotations

from ..config import CSA, HCA
from .storage import BLOCK_POSITIONS, KVStorage, PoolSizes, SequenceState


class OutOfBlocks(RuntimeError):
    """Not enough free blocks of some kind for the requested reservation."""


class SimpleAllocator:
    """Free lists per kind over a `KVStorage` (block 0 is the null block and is never handed out)."""

    def __init__(self, storage: KVStorage):
        self.storage = storage
        s = storage.sizes
        self.free = {k: list(range(n - 1, 0, -1)) for k, n in (("swa", s.swa), ("state", s.state), ("csa", s.csa), ("hca", s.hca))}

    def _blocks_needed(self, positions: int) -> tuple[int, int]:
        cfg = self.storage.cfg
        has_csa, has_hca = bool(cfg.layers_of(CSA)), bool(cfg.layers_of(HCA))
        csa = -(-(positions // cfg.csa_rate) // self.storage.csa_entries) if has_csa else 0
        hca = -(-(positions // cfg.hca_rate) // self.storage.hca_entries) if has_hca else 0
        return csa, hca

    def can_reserve(self, seq: SequenceState | None, positions: int) -> bool:
        csa, hca = self._blocks_needed(positions)
        held_csa, held_hca = (len(seq.csa_blocks), len(seq.hca_blocks)) if seq else (0, 0)
        new_seq = 0 if seq else 1
        return (len(self.free["swa"]) >= new_seq and len(self.free["state"]) >= new_seq
                and len(self.free["csa"]) >= csa - held_csa and len(self.free["hca"]) >= hca - held_hca)

    def new_sequence(self, positions: int) -> SequenceState:
        if not self.can_reserve(None, positions):
            raise OutOfBlocks(f"no room for a {positions}-position sequence")
        seq = SequenceState(ring_block=self.free["swa"].pop(), state_block=self.free["state"].pop())
        self.storage.reset_state(seq.state_block)
        self.reserve(seq, positions)
        return seq

    def reserve(self, seq: SequenceState, positions: int) -> None:
        if not self.can_reserve(seq, positions):
            raise OutOfBlocks(f"no room to extend a sequence to {positions} positions")
        csa, hca = self._blocks_needed(positions)
        while len(seq.csa_blocks) < csa:
            seq.csa_blocks.append(self.free["csa"].pop())
        while len(seq.hca_blocks) < hca:
            seq.hca_blocks.append(self.free["hca"].pop())

    def release(self, seq: SequenceState) -> None:
        self.free["swa"].append(seq.ring_block)
        self.free["state"].append(seq.state_block)
        self.free["csa"].extend(seq.csa_blocks)
        self.free["hca"].extend(seq.hca_blocks)
        seq.csa_blocks, seq.hca_blocks = [], []


def pool_sizes_for(max_sequences: int, max_positions: int) -> PoolSizes:
    """Enough blocks for `max_sequences` requests of `max_positions` each (plus the null block)."""
    per_seq = -(-max_positions // BLOCK_POSITIONS)
    return PoolSizes(swa=max_sequences + 1, state=max_sequences + 1, csa=max_sequences * per_seq + 1, hca=max_sequences * per_seq + 1)
