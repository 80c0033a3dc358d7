"""Tensor storage behind the block ids: per-layer page pools for every cache kind.

A block id of a kind names one page in every layer of that kind, so a request carries one
block table per kind (`SequenceState`). Block 0 is the null block: never handed out, so a
zero-filled table entry can never alias live data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CSA, HCA, ModelConfig

BLOCK_POSITIONS = 256


def entries_per_block(rate: int) -> int:
    if BLOCK_POSITIONS % rate:
        raise ValueError(f"compression rate {rate} must divide the {BLOCK_POSITIONS}-position block")
    return BLOCK_POSITIONS // rate


def gather_entries(pool: torch.Tensor, blocks: list[int], count: int) -> torch.Tensor:
    """The first `count` entries of a request's paged sequence in `pool` [blocks, per_block, dim]."""
    if count == 0:
        return pool.new_zeros(0, pool.shape[-1])
    needed = -(-count // pool.shape[1])
    table = torch.tensor(blocks[:needed], dtype=torch.long, device=pool.device)
    return pool[table].reshape(-1, pool.shape[-1])[:count]


def store_entries(pool: torch.Tensor, blocks: list[int], first: int, entries: torch.Tensor) -> None:
    """Write entries `first ..` of a request's paged sequence; its blocks must already be reserved."""
    if entries.shape[0] == 0:
        return
    per_block = pool.shape[1]
    idx = torch.arange(first, first + entries.shape[0])
    if int(idx[-1]) // per_block >= len(blocks):
        raise RuntimeError(f"no block reserved for compressed entry {int(idx[-1])}; reserve before the forward")
    table = torch.tensor(blocks, dtype=torch.long)[idx // per_block]
    pool[table.to(pool.device), (idx % per_block).to(pool.device)] = entries.to(pool.dtype)


@dataclass(slots=True)
class SequenceState:
    """What the model reads of one request: its position and its block ids per cache kind.

    `position` counts tokens already written (the next token's position). The tables are the
    manager's (reserved up front for every position the request may reach) and never change
    while the request lives; the data sits in `KVStorage` pages.
    """

    ring_block: int
    state_block: int
    position: int = 0
    csa_blocks: list[int] = field(default_factory=list)
    csa_index_blocks: list[int] = field(default_factory=list)
    hca_blocks: list[int] = field(default_factory=list)


class KVStorage:
    """Page pools for one model: rings, compressed entries, index keys, compressor accumulators.

    Main entries and index keys are stored in `dtype` (float32 or bf16 here; FP8 pages are a
    GPU storage format); accumulators are always float32 `[blocks, n_acc, 3, width]` with
    rows (running max, sum of exponentials, weighted sum).
    """

    # zero-filled: a masked slot still enters the weighted sum as 0 * value, which must not be NaN
    def __init__(self, cfg: ModelConfig, sizes: dict[str, int], dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.sizes = sizes
        self.dtype = dtype
        self.device = torch.device(device)
        # the fused Triton kernels serve CUDA caches; the PyTorch reference serves the CPU
        self.use_kernels = self.device.type == "cuda"
        c, ci, w = cfg.head_dim, cfg.index_head_dim, cfg.window
        self.csa_entries = entries_per_block(cfg.csa_rate)
        self.hca_entries = entries_per_block(cfg.hca_rate)
        self.ring = [self._empty(sizes["swa"], w, c) for _ in range(cfg.num_layers)]
        self.comp: dict[int, torch.Tensor] = {}
        self.index: dict[int, torch.Tensor] = {}
        self.acc: dict[int, torch.Tensor] = {}
        self.index_acc: dict[int, torch.Tensor] = {}
        for layer, kind in enumerate(cfg.layer_types):
            if kind == CSA:
                self.comp[layer] = self._empty(sizes["csa_kv"], self.csa_entries, c)
                self.index[layer] = self._empty(sizes["csa_index"], self.csa_entries, ci)
                self.acc[layer] = torch.zeros(sizes["state"], 2, 3, c, dtype=torch.float32, device=self.device)
                self.index_acc[layer] = torch.zeros(sizes["state"], 2, 3, ci, dtype=torch.float32, device=self.device)
            elif kind == HCA:
                self.comp[layer] = self._empty(sizes["hca_kv"], self.hca_entries, c)
                self.acc[layer] = torch.zeros(sizes["state"], 1, 3, c, dtype=torch.float32, device=self.device)

    def _empty(self, blocks: int, entries: int, dim: int) -> torch.Tensor:
        return torch.zeros(blocks, entries, dim, dtype=self.dtype, device=self.device)

    def entries_per_block(self, layer: int) -> int:
        return self.csa_entries if self.cfg.layer_types[layer] == CSA else self.hca_entries

    def comp_blocks(self, seq: SequenceState, layer: int) -> list[int]:
        return seq.csa_blocks if self.cfg.layer_types[layer] == CSA else seq.hca_blocks

    def reset_state(self, block: int) -> None:
        """Empty accumulators (max -inf, sums 0) for a request starting at position 0."""
        for pool in (*self.acc.values(), *self.index_acc.values()):
            pool[block].zero_()
            pool[block, :, 0].fill_(float("-inf"))

    def copy_block(self, kind: str, src: int, dst: int) -> None:
        """Copy one block of a kind in every layer (snapshots for prefix caching, preemption)."""
        if kind == "swa":
            pools = self.ring
        elif kind == "state":
            pools = [*self.acc.values(), *self.index_acc.values()]
        else:
            raise ValueError(f"copy_block supports 'swa' and 'state', not {kind!r}")
        for pool in pools:
            pool[dst].copy_(pool[src])

    def nbytes(self) -> int:
        pools = [*self.ring, *self.comp.values(), *self.index.values(), *self.acc.values(), *self.index_acc.values()]
        return sum(p.numel() * p.element_size() for p in pools)
