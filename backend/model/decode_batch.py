"""One decode step's inputs as device tensors, built once per step and only read by the layers.

`DecodeBatch` is what `Transformer.decode_batch` consumes: per request its position, window-ring
and compressor-state blocks and one block table per compressed kind, plus (for the reference
path) the host `SequenceState`s. `DecodeSlots` keeps those tensors persistently for a decode
engine: a request is written into a row when it joins and moved or cleared when another leaves,
so a step reads the first `n` rows as views (which is what a captured CUDA graph needs) and
nothing is rebuilt per step, let alone per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dsv4.kernels.host_copy import to_device

from ..kv_cache.storage import BLOCK_POSITIONS, SequenceState

TABLE_KINDS = ("csa_blocks", "csa_index_blocks", "hca_blocks")


class DecodeBatch(NamedTuple):
    positions: Tensor  # [B] int64, the position each request's token is written at
    ring_blocks: Tensor  # [B] int32
    state_blocks: Tensor  # [B] int32
    csa_table: Tensor  # [B, W] int32 CSA main-entry blocks (0 = the null block past a request's own)
    csa_index_table: Tensor  # [B, W] int32 CSA index-key blocks
    hca_table: Tensor  # [B, W] int32 HCA blocks
    seqs: tuple[SequenceState, ...] = ()  # host mirror: the reference path reads these
    counts: tuple[tuple[int, Tensor], ...] = ()  # (rate, visible entries [B] int32), once per step

    @classmethod
    def from_seqs(cls, seqs: list[SequenceState], device: torch.device | str) -> DecodeBatch:
        """From host state (one H2D copy per tensor): for callers without persistent slots."""
        width = max([1] + [len(getattr(s, kind)) for s in seqs for kind in TABLE_KINDS])
        tables = torch.zeros(len(TABLE_KINDS), len(seqs), width, dtype=torch.int32)
        for b, s in enumerate(seqs):
            for k, kind in enumerate(TABLE_KINDS):
                blocks = getattr(s, kind)
                tables[k, b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        tables = tables.to(device)
        return cls(
            positions=torch.tensor([s.position for s in seqs], dtype=torch.int64, device=device),
            ring_blocks=torch.tensor([s.ring_block for s in seqs], dtype=torch.int32, device=device),
            state_blocks=torch.tensor([s.state_block for s in seqs], dtype=torch.int32, device=device),
            csa_table=tables[0], csa_index_table=tables[1], hca_table=tables[2], seqs=tuple(seqs),
        )

    def visible(self, rate: int) -> Tensor:
        """Compressed entries each query sees after its own token: `[B]` int32."""
        for r, counts in self.counts:
            if r == rate:
                return counts
        return torch.div(self.positions + 1, rate, rounding_mode="floor").to(torch.int32)

    def with_counts(self, rates: tuple[int, ...]) -> DecodeBatch:
        """The batch with `visible` computed once for each compression rate (not once per layer)."""
        following = self.positions + 1
        return self._replace(counts=tuple((r, torch.div(following, r, rounding_mode="floor").to(torch.int32))
                                          for r in rates))


def table_width(max_positions: int) -> int:
    """Blocks of one compressed kind a request of `max_positions` can hold (at most one per 256 positions)."""
    return max(1, -(-max_positions // BLOCK_POSITIONS))


class DecodeSlots:
    """Persistent per-row decode inputs for up to `capacity` requests; rows 0..size-1 are live.

    Rows past `size` hold the null block and position 0, so a graph captured at a larger batch
    bucket computes harmless garbage there (it writes only the never-read null block).
    """

    def __init__(self, capacity: int, max_positions: int, device: torch.device | str):
        self.capacity, self.device = capacity, torch.device(device)
        i32, i64 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.int64, device=self.device)
        width = table_width(max_positions)
        self.tokens = torch.zeros(capacity, **i64)
        self.positions = torch.zeros(capacity, **i64)
        self.ring_blocks = torch.zeros(capacity, **i32)
        self.state_blocks = torch.zeros(capacity, **i32)
        self.tables = torch.zeros(len(TABLE_KINDS), capacity, width, **i32)
        self.seqs: list[SequenceState | None] = [None] * capacity
        self.size = 0

    def _rows(self) -> list[Tensor]:
        """Every per-row tensor (row = dim 0), for moves and clears."""
        return [self.tokens, self.positions, self.ring_blocks, self.state_blocks, *self.tables.unbind(0)]

    def add(self, seq: SequenceState, token: int) -> int:
        """Write a joining request into the next free row; returns the row."""
        if self.size >= self.capacity:
            raise RuntimeError(f"decode slots full ({self.capacity} rows)")
        row = self.size
        for kind in TABLE_KINDS:  # all checked before the row is written: a refused request leaves it clean
            if len(getattr(seq, kind)) > self.tables.shape[2]:
                raise ValueError(f"request holds {len(getattr(seq, kind))} {kind}, slots were sized for {self.tables.shape[2]}")
        for k, kind in enumerate(TABLE_KINDS):
            blocks = getattr(seq, kind)
            self.tables[k, row, : len(blocks)] = to_device(blocks, torch.int32, self.device)
        self.tokens[row] = token
        self.positions[row] = seq.position
        self.ring_blocks[row] = seq.ring_block
        self.state_blocks[row] = seq.state_block
        self.seqs[row] = seq
        self.size += 1
        return row

    def remove(self, row: int) -> int | None:
        """Free a row by moving the last live row into it; returns the moved row's old index (or None)."""
        last = self.size - 1
        moved = None
        if row != last:
            for t in self._rows():
                t[row] = t[last]
            self.seqs[row] = self.seqs[last]
            moved = last
        for t in self._rows():
            t[last] = 0
        self.seqs[last] = None
        self.size -= 1
        return moved

    def batch(self, n: int) -> DecodeBatch:
        """Views of rows 0..n-1 (n may exceed size: a graph bucket's padding rows)."""
        live = tuple(s for s in self.seqs[: min(n, self.size)] if s is not None)
        return DecodeBatch(self.positions[:n], self.ring_blocks[:n], self.state_blocks[:n],
                           self.tables[0, :n], self.tables[1, :n], self.tables[2, :n], live)

    def advance(self, n: int) -> None:
        """After a step: every live request moved one position (host mirror and device rows)."""
        self.positions[:n].add_(1)
        for seq in self.seqs[:n]:
            seq.position += 1
