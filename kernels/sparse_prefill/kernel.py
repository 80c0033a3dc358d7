"""Sparse prefill attention: query tokens of one or several requests over a causal sliding window of raw entries plus
compressed entries (top-k selected per query, or all visible), sink, inverse RoPE at each query's position.

It runs the decode kernel (`sparse_decode.kernel.sparse_attn_fwd_kernel`, VARLEN) with one program per query
and head block: the raw window rows come from one contiguous tensor instead of a ring, the compressed
entries through the query's request's block table, and each query's visible count floor((t + 1) / rate)
bounds both the HCA list and the CSA indices. One launch covers the queries of several prompts.
"""

from __future__ import annotations

import torch

from ..common import check_contiguous, check_dtype
from ..host_copy import to_device
from ..sparse_decode.kernel import pool_geometry, sparse_attention


def sparse_prefill_batch(
    q: torch.Tensor,
    positions: torch.Tensor,
    requests: torch.Tensor,
    kv: torch.Tensor,
    win_lo: torch.Tensor,
    win_base: torch.Tensor,
    window: int,
    comp: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    num_comp: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    max_comp_keys: int,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_inv_freq: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    max_splits: int = 1,
    min_split_keys: int = 128,
) -> torch.Tensor:
    """Sparse attention for the prompt tokens of several requests in one launch (a prefill pass).

    Args:
        q: `[T, H, D]` float32 or bfloat16 (rows contiguous), RoPE applied at each query's position.
        positions: `[T]` int64, each query's position t.
        requests: `[T]` int32, each query's request r (an index into win_lo, win_base and block_tables).
        kv: `[N, D]` float32/bfloat16 contiguous raw K=V rows of every request: request r's run starts at row
            win_base[r] with position win_lo[r] and holds every position up to its last query's (a query at t
            sees positions max(t - window + 1, win_lo[r]) .. t of it).
        win_lo, win_base: `[R]` int64.
        window: sliding-window size W (128).
        comp: compressed pool `[num_blocks, E, D]` float32/bfloat16 or FP8 pages `[num_blocks, E * entry_bytes]`
            uint8; None for sliding-window-only layers.
        block_tables: `[R, max_blocks]` int32, row r request r's compressed blocks.
        num_comp: `[T]` int32, compressed entries visible to each query (floor((t + 1) / rate)).
        topk_idx: `[T, K]` int32 per-query entry indices (CSA; -1 skipped) or None (HCA: all visible entries).
        max_comp_keys: the most compressed keys any query reads (K, or the largest num_comp).
        sink: `[H]` float32.  softmax_scale: logit scale.  rope_inv_freq: `[R/2]` float32 (inverse RoPE at t).
        out: optional `[T, H, D]` output (q's dtype).
        max_splits, min_split_keys: split-K plan per query (as in `sparse_decode`; T queries fill the GPU).

    Returns:
        `[T, H, D]` in q's dtype.
    """
    check_dtype("q", q, torch.float32, torch.bfloat16)
    assert q.dim() == 3 and q.stride(2) == 1
    n_q, num_heads, d = q.shape
    check_dtype("positions", positions, torch.int64)
    check_dtype("requests", requests, torch.int32)
    check_dtype("win_lo", win_lo, torch.int64)
    check_dtype("win_base", win_base, torch.int64)
    assert positions.shape == (n_q,) and requests.shape == (n_q,) and win_lo.shape == win_base.shape
    check_dtype("kv", kv, torch.float32, torch.bfloat16)
    assert kv.dim() == 2 and kv.shape[1] == d, f"kv must be [N, {d}], got {tuple(kv.shape)}"
    check_contiguous(kv=kv, positions=positions, requests=requests, win_lo=win_lo, win_base=win_base, sink=sink,
                     rope_inv_freq=rope_inv_freq)
    assert sink.shape == (num_heads,) and sink.dtype == torch.float32
    if comp is not None:
        assert block_tables is not None and num_comp is not None
        check_dtype("block_tables", block_tables, torch.int32)
        check_dtype("num_comp", num_comp, torch.int32)
        assert block_tables.dim() == 2 and block_tables.shape[0] == win_lo.shape[0] and block_tables.stride(1) == 1
        assert num_comp.shape == (n_q,)
        check_contiguous(num_comp=num_comp)
        if topk_idx is not None:
            check_dtype("topk_idx", topk_idx, torch.int32)
            assert topk_idx.dim() == 2 and topk_idx.shape[0] == n_q and topk_idx.stride(1) == 1
            assert max_comp_keys == topk_idx.shape[1]
    else:
        assert topk_idx is None
    return sparse_attention(
        q, positions, sink, softmax_scale, rope_inv_freq, kv.view(1, kv.shape[0], d), requests, window,
        comp, block_tables, block_tables.stride(0) if comp is not None else 0, num_comp, topk_idx, max_comp_keys, out,
        max_splits, min_split_keys=min_split_keys, varlen=(requests, win_lo, win_base),
    )


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
    """Sparse attention for the S prompt tokens at positions start_pos .. start_pos + S - 1 of one request
    (`sparse_prefill_batch` with one request).

    Args:
        q: `[S, H, D]` float32 or bfloat16 (rows contiguous), RoPE applied at each query's position.
        start_pos: position of q[0].
        kv: `[S_hist + S, D]` float32/bfloat16 contiguous raw K=V entries of positions
            start_pos - S_hist .. start_pos + S - 1 (S_hist <= window - 1; pass S_hist = min(start_pos, window - 1)
            for the full window). Query t sees rows at positions max(0, t - window + 1, start_pos - S_hist) .. t.
        window: sliding-window size W (128).
        comp: compressed pool, as in `sparse_prefill_batch`; None for sliding-window-only layers.
        block_table: `[max_blocks]` int32, the request's compressed blocks.
        topk_idx: `[S, K]` int32 per-query entry indices (CSA; -1 skipped) or None (HCA: all visible entries).
        rate: compression rate; query t sees compressed entries i < (t + 1) // rate.
        sink, softmax_scale, rope_inv_freq, out, max_splits, min_split_keys: as in `sparse_prefill_batch`.

    Returns:
        `[S, H, D]` in q's dtype.
    """
    check_dtype("q", q, torch.float32, torch.bfloat16)
    assert q.dim() == 3 and q.stride(2) == 1
    s_len, _, d = q.shape
    assert kv.dim() == 2 and kv.shape[1] == d and kv.shape[0] >= s_len, f"kv must be [S_hist + S, {d}], got {tuple(kv.shape)}"
    hist = kv.shape[0] - s_len
    assert hist <= window - 1, f"S_hist {hist} > window - 1"
    device = q.device
    positions = torch.arange(start_pos, start_pos + s_len, dtype=torch.int64, device=device)
    requests = torch.zeros(s_len, dtype=torch.int32, device=device)
    lo_base = to_device([start_pos - hist, 0], torch.int64, device)
    num_comp, max_comp_keys, tables = None, 0, None
    if comp is not None:
        assert block_table is not None and rate > 0
        check_dtype("block_table", block_table, torch.int32)
        assert block_table.dim() == 1 and block_table.is_contiguous()
        num_comp = ((positions + 1) // rate).to(torch.int32)
        _, comp_rows = pool_geometry(comp, d, 2 * rope_inv_freq.shape[0], "comp")
        tables = block_table[None]
        # the top-k lists are checked by sparse_prefill_batch
        max_comp_keys = topk_idx.shape[-1] if topk_idx is not None else \
            min((start_pos + s_len) // rate, block_table.shape[0] * comp_rows)
    return sparse_prefill_batch(q, positions, requests, kv, lo_base[:1], lo_base[1:], window, comp, tables, num_comp,
                                topk_idx, max_comp_keys, sink, softmax_scale, rope_inv_freq, out=out,
                                max_splits=max_splits, min_split_keys=min_split_keys)


__all__ = ["sparse_prefill", "sparse_prefill_batch"]
