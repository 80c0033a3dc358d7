"""Tensor storage behind the block ids: per-layer page pools for every cache kind.

A block id of a kind names one page in every layer of that kind, so a request carries one
block table per kind (`SequenceState`). Block 0 is the null block: never handed out, so a
zero-filled table entry can never alias live data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CSA, HCA, ModelConfig
from .pools import FLOAT, PagedPool

BLOCK_POSITIONS = 256


def entries_per_block(rate: int) -> int:
    if BLOCK_POSITIONS % rate:
        raise ValueError(f"compression rate {rate} must divide the {BLOCK_POSITIONS}-position block")
    return BLOCK_POSITIONS // rate


def gather_entries(pool: PagedPool, blocks: list[int], count: int) -> torch.Tensor:
    """The first `count` entries of a request's paged sequence: `[count, dim]`."""
    device = pool.tensor.device
    if count == 0:
        return torch.zeros(0, pool.dim, dtype=pool.dtype, device=device)
    needed = -(-count // pool.entries)
    table = torch.tensor(blocks[:needed], dtype=torch.long, device=device)
    return pool.read_pages(table).reshape(-1, pool.dim)[:count]


def store_entries(pool: PagedPool, blocks: list[int], first: int, entries: torch.Tensor) -> None:
    """Write entries `first ..` of a request's paged sequence; its blocks must already be reserved."""
    if entries.shape[0] == 0:
        return
    idx = torch.arange(first, first + entries.shape[0])
    if int(idx[-1]) // pool.entries >= len(blocks):
        raise RuntimeError(f"no block reserved for compressed entry {int(idx[-1])}; reserve before the forward")
    table = torch.tensor(blocks, dtype=torch.long)[idx // pool.entries]
    device = pool.tensor.device
    pool.write(table.to(device), (idx % pool.entries).to(device), entries)


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

    `main_format` ("float", or "main_fp8": 584-byte entries at V4 shapes) stores window and
    compressed K=V entries; `index_format` ("float", "index_fp8", "index_fp4") the indexer keys.
    Float pools hold `dtype`. Accumulators are always float32 `[blocks, n_acc, 3, width]` with rows
    (running max, sum of exponentials, weighted sum).
    """

    def __init__(self, cfg: ModelConfig, sizes: dict[str, int], dtype: torch.dtype, device: torch.device | str = "cpu",
                 main_format: str = FLOAT, index_format: str = FLOAT):
        self.cfg = cfg
        self.sizes = sizes
        self.dtype = dtype
        self.device = torch.device(device)
        self.main_format, self.index_format = main_format, index_format
        # the fused Triton kernels serve CUDA caches; the PyTorch reference serves the CPU
        self.use_kernels = self.device.type == "cuda"
        c, ci, w = cfg.head_dim, cfg.index_head_dim, cfg.window
        self.csa_entries = entries_per_block(cfg.csa_rate)
        self.hca_entries = entries_per_block(cfg.hca_rate)

        def main(blocks: int, entries: int) -> PagedPool:
            return PagedPool(blocks, entries, c, main_format, dtype, self.device, cfg.rope_dim)

        self.ring = [main(sizes["swa"], w) for _ in range(cfg.num_layers)]
        self.comp: dict[int, PagedPool] = {}
        self.index: dict[int, PagedPool] = {}
        self.acc: dict[int, torch.Tensor] = {}
        self.index_acc: dict[int, torch.Tensor] = {}
        for layer, kind in enumerate(cfg.layer_types):
            if kind == CSA:
                self.comp[layer] = main(sizes["csa_kv"], self.csa_entries)
                self.index[layer] = PagedPool(sizes["csa_index"], self.csa_entries, ci, index_format, dtype, self.device, cfg.rope_dim)
                self.acc[layer] = torch.zeros(sizes["state"], 2, 3, c, dtype=torch.float32, device=self.device)
                self.index_acc[layer] = torch.zeros(sizes["state"], 2, 3, ci, dtype=torch.float32, device=self.device)
            elif kind == HCA:
                self.comp[layer] = main(sizes["hca_kv"], self.hca_entries)
                self.acc[layer] = torch.zeros(sizes["state"], 1, 3, c, dtype=torch.float32, device=self.device)

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
            pools = [pool.tensor for pool in self.ring]
        elif kind == "state":
            pools = [*self.acc.values(), *self.index_acc.values()]
        else:
            raise ValueError(f"copy_block supports 'swa' and 'state', not {kind!r}")
        for pool in pools:
            pool[dst].copy_(pool[src])

    def nbytes(self) -> int:
        pools = [*self.ring, *self.comp.values(), *self.index.values()]
        accs = [*self.acc.values(), *self.index_acc.values()]
        return sum(p.nbytes() for p in pools) + sum(a.numel() * a.element_size() for a in accs)
