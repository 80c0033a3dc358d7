"""Sparse prefill attention: S query tokens of one request over a causal sliding window of raw entries plus
compressed entries (top-k selected per query, or all visible), sink, inverse RoPE at each query's position.

It runs the decode kernel (`sparse_decode.kernel.sparse_attn_fwd_kernel`) with one program per query and
head block: the raw window rows come from one contiguous tensor instead of a ring, the compressed
entries through the request's single block table (row stride 0), and each query's visible count
floor((t + 1) / rate) bounds both the HCA list and the CSA indices.
"""

from __future__ import annotations

import torch

from ..common import check_contiguous, check_dtype
from ..sparse_decode.kernel import pool_geometry, sparse_attention


def sparse_prefill(
    q: torch.Tensor,
    start_pos: int,
    kv: torch.Tensor,
    window: int,
    comp: torch.Tensor | None,
    block_table: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    rate: int,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_inv_freq: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    max_splits: int = 1,
    min_split_keys: int = 128,
) -> torch.Tensor:
    """Sparse attention for the S prompt tokens at positions start_pos .. start_pos + S - 1 of one request.

    Args:
        q: `[S, H, D]` float32 or bfloat16 (rows contiguous), RoPE applied at each query's position.
        start_pos: position of q[0].
        kv: `[S_hist + S, D]` float32/bfloat16 contiguous raw K=V entries of positions
            start_pos - S_hist .. start_pos + S - 1 (S_hist <= window - 1; pass S_hist = min(start_pos, window - 1)
            for the full window). Query t sees rows at positions max(0, t - window + 1, start_pos - S_hist) .. t.
        window: sliding-window size W (128).
        comp: compressed pool `[num_blocks, E, D]` float32/bfloat16 or FP8 pages `[num_blocks, E * entry_bytes]`
            uint8; None for sliding-window-only layers.
        block_table: `[max_blocks]` int32, the request's compressed blocks.
        topk_idx: `[S, K]` int32 per-query entry indices (CSA; -1 skipped) or None (HCA: all visible entries).
        rate: compression rate; query t sees compressed entries i < (t + 1) // rate.
        sink: `[H]` float32.  softmax_scale: logit scale.  rope_inv_freq: `[R/2]` float32 (inverse RoPE at t).
        out: optional `[S, H, D]` output (q's dtype).
        max_splits, min_split_keys: split-K plan per query (as in `sparse_decode`; S queries fill the GPU).

    Returns:
        `[S, H, D]` in q's dtype.
    """
    check_dtype("q", q, torch.float32, torch.bfloat16)
    assert q.dim() == 3 and q.stride(2) == 1
    s_len, num_heads, d = q.shape
    check_dtype("kv", kv, torch.float32, torch.bfloat16)
    assert kv.dim() == 2 and kv.shape[1] == d and kv.shape[0] >= s_len, f"kv must be [S_hist + S, {d}], got {tuple(kv.shape)}"
    check_contiguous(kv=kv, sink=sink, rope_inv_freq=rope_inv_freq)
    hist = kv.shape[0] - s_len
    assert hist <= window - 1, f"S_hist {hist} > window - 1"
    assert sink.shape == (num_heads,) and sink.dtype == torch.float32
    device = q.device
    win = kv.view(1, kv.shape[0], d)
    win_page = torch.zeros(max(s_len, 1), dtype=torch.int32, device=device)
    positions = torch.arange(start_pos, start_pos + s_len, dtype=torch.int64, device=device)
    num_comp, max_comp_keys = None, 0
    if comp is not None:
        assert block_table is not None and rate > 0
        check_dtype("block_table", block_table, torch.int32)
        assert block_table.dim() == 1 and block_table.is_contiguous()
        num_comp = ((positions + 1) // rate).to(torch.int32)
        _, comp_rows = pool_geometry(comp, d, 2 * rope_inv_freq.shape[0], "comp")
        if topk_idx is not None:
            check_dtype("topk_idx", topk_idx, torch.int32)
            assert topk_idx.dim() == 2 and topk_idx.shape[0] == s_len and topk_idx.stride(1) == 1
            max_comp_keys = topk_idx.shape[1]
        else:
            max_comp_keys = min((start_pos + s_len) // rate, block_table.shape[0] * comp_rows)
    else:
        assert topk_idx is None
    return sparse_attention(
        q, positions, sink, softmax_scale, rope_inv_freq, win, win_page, start_pos - hist, window,
        comp, block_table, 0, num_comp, topk_idx, max_comp_keys, out, max_splits, min_split_keys=min_split_keys,
    )


__all__ = ["sparse_prefill"]
