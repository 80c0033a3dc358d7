"""The device inputs of one prefill pass on the kernel path: several prompts' chunks laid end to end.

Every layer of a pass reads the same positions, window rows and block tables (the tables never
change while a request lives, and `seq.position` moves only after the pass), so they are built
once per pass, before the first layer, with one host-to-device copy per tensor. The layers then
run each attention kernel once over all the pass's tokens (projections, norms, RoPE, window reads
and writes, both compressors, the indexer and the sparse attention), whatever the number of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from dsv4.kernels.compressor.kernel import PrefillSpans
from dsv4.kernels.host_copy import to_device

from ..kv_cache.storage import SequenceState


class PassInputs(NamedTuple):
    positions: torch.Tensor  # [T] int64
    hist_blocks: torch.Tensor  # [H] ring block of each window row read before the chunks (H may be 0)
    hist_slots: torch.Tensor  # [H] its ring slot
    raw_order: torch.Tensor | None  # [H + T] rows of cat(history, chunk keys) in raw-window order (None: identity)
    tail_rows: torch.Tensor  # [U] rows of the chunk keys that stay in the ring (each prompt's last `window`)
    tail_blocks: torch.Tensor  # [U]
    tail_slots: torch.Tensor  # [U]
    csa_table: torch.Tensor  # [R, W] int32 block tables, zero past a prompt's own blocks
    csa_index_table: torch.Tensor
    hca_table: torch.Tensor
    spans: PrefillSpans  # the compressors' view of the same chunks
    requests: torch.Tensor  # [T] int32: each token's prompt
    win_lo: torch.Tensor  # [R] int64: each prompt's first raw-window position
    win_base: torch.Tensor  # [R] int64: its row in the raw windows (each prompt's history rows, then its chunk's)
    visible: dict[int, tuple[torch.Tensor, int]]  # rate -> ([T] int32 entries each token sees, the most any sees)

    @classmethod
    def build(cls, seqs: Sequence[SequenceState], lengths: Sequence[int], window: int, rates: Sequence[int],
              device: torch.device | str) -> PassInputs:
        starts = [s.position for s in seqs]  # seq.position moves only after the pass
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        hists = [min(start, window - 1) for start in starts]
        hist_pos = [np.arange(start - h, start) for start, h in zip(starts, hists)]
        raw_bounds = np.concatenate([[0], np.cumsum([h + n for h, n in zip(hists, lengths)])])
        tails = [np.arange(max(bounds[r], bounds[r + 1] - window), bounds[r + 1]) for r in range(len(seqs))]
        tail_pos = np.concatenate([t - bounds[r] + starts[r] for r, t in enumerate(tails)])
        ring_of = lambda parts: np.concatenate([np.full(len(p), s.ring_block) for p, s in zip(parts, seqs)])  # noqa: E731
        ints = lambda values: to_device(np.asarray(values, dtype=np.int64), torch.int64, device)  # noqa: E731
        positions = ints(np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]))
        all_hist = np.concatenate(hist_pos)
        return cls(
            positions, ints(ring_of(hist_pos)), ints(all_hist % window),
            None if len(seqs) == 1 else ints(_raw_order(hists, bounds)),
            ints(np.concatenate(tails)), ints(ring_of(tails)), ints(tail_pos % window),
            _tables([s.csa_blocks for s in seqs], device), _tables([s.csa_index_blocks for s in seqs], device),
            _tables([s.hca_blocks for s in seqs], device),
            PrefillSpans.build(list(zip(starts, lengths)), [s.state_block for s in seqs], device),
            to_device(np.repeat(np.arange(len(seqs)), lengths), torch.int32, device),
            ints([start - h for start, h in zip(starts, hists)]), ints(raw_bounds[:-1]),
            {rate: (((positions + 1) // rate).to(torch.int32), max((a + n) // rate for a, n in zip(starts, lengths)))
             for rate in rates})

    def comp_table(self, csa: bool) -> torch.Tensor:
        """The compressed-entry tables of a CSA (True) or HCA layer."""
        return self.csa_table if csa else self.hca_table


def _raw_order(hists: list[int], bounds: np.ndarray) -> np.ndarray:
    """Rows of cat(all histories, all chunk keys) in raw-window order: each prompt's history rows,
    then its chunk's."""
    hist_at = np.concatenate([[0], np.cumsum(hists)]).astype(np.int64)
    return np.concatenate([np.concatenate([np.arange(hist_at[r], hist_at[r + 1]), hist_at[-1] + np.arange(bounds[r], bounds[r + 1])])
                           for r in range(len(hists))])


def _tables(blocks: list[list[int]], device) -> torch.Tensor:
    """`[R, W]` int32, W >= 1, each row a request's blocks then zeros."""
    width = max(1, *(len(b) for b in blocks))
    table = np.zeros((len(blocks), width), dtype=np.int32)
    for r, b in enumerate(blocks):
        table[r, :len(b)] = b
    return to_device(table, torch.int32, device)
