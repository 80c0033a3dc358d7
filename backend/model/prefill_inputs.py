"""One prompt's device inputs for a prefill pass on the kernel path, built once per pass.

Every layer of a pass reads the same positions, window rows and block tables (the tables never
change while a request lives, and `seq.position` moves only after the pass), so they are made
once per prompt before the first layer, not once per layer: a pass of R prompts through L layers
makes R sets of them instead of R x L.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsv4.kernels.host_copy import to_device

from ..kv_cache.storage import SequenceState


class PrefillInputs(NamedTuple):
    start: int  # the chunk's first position (seq.position before the pass)
    positions: torch.Tensor  # [n] int64: start .. start + n - 1
    hist_blocks: torch.Tensor  # [h] ring block of each window row before the chunk (h = min(start, window - 1))
    hist_slots: torch.Tensor  # [h] their ring slots
    tail_blocks: torch.Tensor  # [t] ring block of the chunk's last `window` rows (t = min(n, window))
    tail_slots: torch.Tensor  # [t] their ring slots
    csa_table: torch.Tensor  # int32 block tables ([0] when the request has none of a kind)
    csa_index_table: torch.Tensor
    hca_table: torch.Tensor

    @classmethod
    def build(cls, seq: SequenceState, count: int, window: int, device: torch.device | str) -> PrefillInputs:
        start = seq.position
        positions = torch.arange(start, start + count, device=device)
        hist = torch.arange(start - min(start, window - 1), start, device=device)
        tail = positions[-window:]
        return cls(start, positions, torch.full_like(hist, seq.ring_block), hist % window,
                   torch.full_like(tail, seq.ring_block), tail % window,
                   to_device(seq.csa_blocks or [0], torch.int32, device),
                   to_device(seq.csa_index_blocks or [0], torch.int32, device),
                   to_device(seq.hca_blocks or [0], torch.int32, device))

    def comp_table(self, csa: bool) -> torch.Tensor:
        """The compressed-entry table of a CSA (True) or HCA layer."""
        return self.csa_table if csa else self.hca_table
