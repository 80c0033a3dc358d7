"""Lightning-Indexer scores and exact top-k by a fused radix select.

Pipeline per call (every launch has a fixed grid, so it can be captured in a CUDA graph):

1. `indexer_score_kernel`: each program walks key tiles `[BLOCK_N, C]` of one query (paged, FP8/FP4
   dequantized on load), forms `relu(K q^T) w` on the tensor cores, stores the float32 scores and
   folds the top 8 bits of each score's order-preserving integer key into a 256-bin histogram
   (one atomic flush per program).
2. `indexer_radix_kernel` (levels 1, 2, 3): from the histograms so far every program finds the bin
   holding the k-th largest score (the prefix) and histograms the next 8 bits of the scores that
   share that prefix. A level whose bin is taken whole ends the search; later levels then do nothing.
3. `indexer_count_kernel` counts, per tile of candidates, the scores above the final prefix and those
   equal to it; `indexer_select_kernel` turns the counts into exclusive prefix sums and writes the
   indices of every score above the prefix plus the lowest-indexed ties it needs, in index order;
   the rest of the row is -1.

So the scores are written once (4 B per candidate) and re-read from L2 once per level; no sort. Tile
sizes are fixed by the candidate count alone and no output position comes from an atomic, so a
query's selection (and its order) never depends on the batch it is in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import cdiv, check_contiguous, check_dtype, dot_dtype, next_pow2, num_sms
from ..kv_format.kernel import load_index_fp4, load_index_fp8
from ..kv_format.layout import IndexLayout

NUM_LEVELS = 4  # 8 bits per level
WS_INTS = 4 * 256 + 4  # int32 per query: histograms, then counters
TILES_MIN = 256  # count/select tile slots per query: 256 x 1024-key tiles cover a million tokens
WS_STRIDE = tl.constexpr(WS_INTS)


@triton.jit
def order_key(score):
    """Float32 -> uint32 with the same order (-0.0 folded onto +0.0)."""
    bits = score.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, 0, bits)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def masked_histogram(byte, mask):
    """256-bin histogram of `byte` (uint32 in 0..255) over the lanes where mask is set: masked lanes go to
    bin 0 and are taken back out of it (cheaper than a separate overflow bin)."""
    bins = tl.where(mask, byte.to(tl.int32), 0)
    h = tl.histogram(bins, 256)
    n_out = tl.sum((~mask).to(tl.int32), 0)
    return h - tl.where(tl.arange(0, 256) == 0, n_out, 0)


@triton.jit
def radix_state(hist_ptr, need0, LEVELS: tl.constexpr):
    """Walk the per-level 256-bin histograms `hist_ptr[LEVELS, 256]` of one query.

    Returns (prefix, need, live): `prefix` holds 8 bits per level walked, `need` how many of the
    scores sharing that prefix still belong to the top k, `live` whether the last level walked left
    the k-th score undecided (its bin holds more scores than needed).
    """
    o = tl.arange(0, 256)
    prefix = need0 * 0
    need = need0
    live = need0 > 0
    for lvl in tl.static_range(LEVELS):
        h = tl.load(hist_ptr + lvl * 256 + (255 - o))  # bins from the top down
        incl = tl.cumsum(h, 0)
        above = incl < need
        t_rev = tl.sum(above.to(tl.int32), 0)
        cum_above = tl.sum(tl.where(above, h, 0), 0)
        in_bin = tl.sum(tl.where(o == t_rev, h, 0), 0)
        new_prefix = (prefix << 8) | (255 - t_rev)
        new_need = need - cum_above
        prefix = tl.where(live, new_prefix, prefix)
        need = tl.where(live, new_need, need)
        live = live & (in_bin > new_need)
    return prefix, need, live


# a prefill pass's tables are as wide as its longest prompt: one compiled variant for every width
@triton.jit(do_not_specialize=["bt_stride"])
def indexer_score_kernel(
    q_ptr, w_ptr, w_scale, keys_ptr, keys_f32_ptr, block_table_ptr, bt_stride, table_row_ptr, num_visible_ptr,
    scores_ptr, hist_ptr, stride_qb, stride_qh, stride_wb, scores_stride, entries_per_page, page_bytes,
    N_HEADS: tl.constexpr, C: tl.constexpr, KEY_FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HI: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_MAP: tl.constexpr,
):
    """KEY_FMT: 0 float pool `[P, E, C]`, 1 FP8 pages, 2 FP4 pages. ROW_MAP: query i_b reads table row
    table_row[i_b] (queries of several prompts), else row i_b."""
    i_b = tl.program_id(0).to(tl.int64)
    if ROW_MAP:
        table = block_table_ptr + tl.load(table_row_ptr + i_b).to(tl.int64) * bt_stride
    else:
        table = block_table_ptr + i_b * bt_stride
    i_p = tl.program_id(1)
    n_prog = tl.num_programs(1)
    n = tl.load(num_visible_ptr + i_b)
    o_h = tl.arange(0, BLOCK_HI)
    m_h = o_h < N_HEADS
    o_c = tl.arange(0, C)
    o_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + i_b * stride_qb + o_h[:, None] * stride_qh + o_c[None, :], mask=m_h[:, None], other=0.0).to(DTYPE)
    w = tl.load(w_ptr + i_b * stride_wb + o_h, mask=m_h, other=0.0).to(tl.float32) * w_scale
    o_bin = tl.arange(0, 256)
    hist = tl.zeros([256], dtype=tl.int32)
    for tile in range(i_p, tl.cdiv(n, BLOCK_N), n_prog):
        i = tile * BLOCK_N + o_n
        m_i = i < n
        page = tl.load(table + i // entries_per_page, mask=m_i, other=0).to(tl.int64)
        row = (i % entries_per_page).to(tl.int64)
        if KEY_FMT == 1:
            k, k_scale = load_index_fp8(keys_ptr, keys_f32_ptr, page * page_bytes, row, m_i, entries_per_page, C, DTYPE)
            s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * k_scale[:, None]  # [BLOCK_N, BLOCK_HI]
        else:
            if KEY_FMT == 2:
                k = load_index_fp4(keys_ptr, page * page_bytes, row, m_i, entries_per_page, C, DTYPE)
            else:
                k = tl.load(keys_ptr + (page * entries_per_page + row)[:, None] * C + o_c[None, :], mask=m_i[:, None], other=0.0)
                k = k.to(DTYPE)
            s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        score = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)  # [BLOCK_N]
        tl.store(scores_ptr + i_b * scores_stride + i, score, mask=m_i)
        hist += masked_histogram(order_key(score) >> 24, m_i)
    tl.atomic_add(hist_ptr + i_b * WS_STRIDE + o_bin, hist)


@triton.jit
def indexer_radix_kernel(
    scores_ptr, hist_ptr, num_visible_ptr, scores_stride, topk,
    LEVEL: tl.constexpr, BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    n_prog = tl.num_programs(1)
    n = tl.load(num_visible_ptr + i_b)
    hist_b = hist_ptr + i_b * WS_STRIDE
    need0 = tl.where(n > topk, topk, 0)  # n <= topk: everything is selected, nothing to search
    prefix, need, live = radix_state(hist_b, need0, LEVEL)
    if live:
        o = tl.arange(0, BLOCK)
        hist = tl.zeros([256], dtype=tl.int32)
        for tile in range(i_p, tl.cdiv(n, BLOCK), n_prog):
            i = tile * BLOCK + o
            m_i = i < n
            key = order_key(tl.load(scores_ptr + i_b * scores_stride + i, mask=m_i, other=0.0))
            match = m_i & ((key >> (32 - 8 * LEVEL)) == prefix.to(tl.uint32))
            hist += masked_histogram((key >> (24 - 8 * LEVEL)) & 255, match)
        tl.atomic_add(hist_b + LEVEL * 256 + tl.arange(0, 256), hist)


@triton.jit
def final_prefix(hist_b, n, topk):
    """(shift, prefix, ties needed) of one query after the radix levels."""
    need0 = tl.where(n <= topk, 0, topk)
    # how many levels the search walked: it stops at the first level whose bin is taken whole
    prefix1, need1, live1 = radix_state(hist_b, need0, 1)
    prefix2, need2, live2 = radix_state(hist_b, need0, 2)
    prefix3, need3, live3 = radix_state(hist_b, need0, 3)
    prefix4, need4, live4 = radix_state(hist_b, need0, 4)
    shift = tl.where(live1, tl.where(live2, tl.where(live3, 0, 8), 16), 24)
    prefix = tl.where(live1, tl.where(live2, tl.where(live3, prefix4, prefix3), prefix2), prefix1).to(tl.uint32)
    need_eq = tl.where(live1, tl.where(live2, tl.where(live3, need4, need3), need2), need1)
    return shift, prefix, need_eq


@triton.jit
def classify(scores_ptr, scores_stride, i_b, i, n, topk, shift, prefix):
    """(above, tied) lanes of candidates i: above the final prefix (or everything), equal to it."""
    m_i = i < n
    key = order_key(tl.load(scores_ptr + i_b * scores_stride + i, mask=m_i, other=0.0))
    top = key >> shift.to(tl.uint32)
    all_v = (i * 0 + n) <= topk  # n <= topk as a vector (scalar-vector boolean ops trip the interpreter)
    gt = m_i & ((top > prefix) | all_v)
    eq = m_i & (top == prefix) & (~all_v)
    return gt, eq


@triton.jit
def indexer_count_kernel(
    scores_ptr, hist_ptr, num_visible_ptr, counts_ptr, scores_stride, topk,
    BLOCK: tl.constexpr, TILES_P2: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    n_prog = tl.num_programs(1)
    n = tl.load(num_visible_ptr + i_b)
    shift, prefix, need_eq = final_prefix(hist_ptr + i_b * WS_STRIDE, n, topk)
    o = tl.arange(0, BLOCK)
    for tile in range(i_p, tl.cdiv(n, BLOCK), n_prog):
        gt, eq = classify(scores_ptr, scores_stride, i_b, tile * BLOCK + o, n, topk, shift, prefix)
        tl.store(counts_ptr + (i_b * 2 * TILES_P2) + tile, tl.sum(gt.to(tl.int32), 0))
        tl.store(counts_ptr + (i_b * 2 * TILES_P2) + TILES_P2 + tile, tl.sum(eq.to(tl.int32), 0))


@triton.jit
def indexer_select_kernel(
    scores_ptr, hist_ptr, num_visible_ptr, counts_ptr, out_ptr, scores_stride, out_stride, topk,
    BLOCK: tl.constexpr, TILES_P2: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    n_prog = tl.num_programs(1)
    n = tl.load(num_visible_ptr + i_b)
    shift, prefix, need_eq = final_prefix(hist_ptr + i_b * WS_STRIDE, n, topk)
    n_tiles = tl.cdiv(n, BLOCK)
    o_t = tl.arange(0, TILES_P2)
    m_t = o_t < n_tiles
    gt_counts = tl.load(counts_ptr + i_b * 2 * TILES_P2 + o_t, mask=m_t, other=0)
    eq_counts = tl.load(counts_ptr + i_b * 2 * TILES_P2 + TILES_P2 + o_t, mask=m_t, other=0)
    eq_before = tl.cumsum(eq_counts, 0) - eq_counts
    taken = gt_counts + tl.minimum(tl.maximum(need_eq - eq_before, 0), eq_counts)  # per tile
    o = tl.arange(0, BLOCK)
    for tile in range(i_p, n_tiles, n_prog):
        i = tile * BLOCK + o
        gt, eq = classify(scores_ptr, scores_stride, i_b, i, n, topk, shift, prefix)
        ties_before = tl.sum(tl.where(o_t < tile, eq_counts, 0), 0)
        eq_rank = ties_before + tl.cumsum(eq.to(tl.int32), 0) - 1
        take = gt | (eq & (eq_rank < need_eq))
        pos = tl.sum(tl.where(o_t < tile, taken, 0), 0) + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out_ptr + i_b * out_stride + pos, i.to(tl.int32), mask=take)
    # the tail past min(topk, n) holds -1
    kept = tl.minimum(n, topk)
    for start in range(i_p * BLOCK, topk, n_prog * BLOCK):
        j = start + o
        tl.store(out_ptr + i_b * out_stride + j, tl.full([BLOCK], -1, dtype=tl.int32), mask=(j >= kept) & (j < topk))


# ---- host side -------------------------------------------------------------------------------


def _key_geometry(keys: torch.Tensor, dim: int, key_format: str | None) -> tuple[int, int, int]:
    """(KEY_FMT code, entries per page, page bytes or 0)."""
    check_contiguous(keys=keys)
    if keys.dtype == torch.uint8:
        assert key_format in ("fp8", "fp4"), "uint8 index keys need key_format='fp8' or 'fp4'"
        lay = IndexLayout(dim, key_format)
        return (1 if key_format == "fp8" else 2), lay.entries_per_page(keys.shape[1]), keys.shape[1]
    check_dtype("keys", keys, torch.float32, torch.bfloat16)
    assert keys.dim() == 3 and keys.shape[2] == dim, f"keys must be [num_blocks, E, {dim}], got {tuple(keys.shape)}"
    return 0, keys.shape[1], 0


def indexer_topk(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, block_table: torch.Tensor, bt_stride: int,
    num_visible: torch.Tensor, topk: int, max_visible: int, key_format: str | None,
    out: torch.Tensor | None = None, scores: torch.Tensor | None = None, launch: tuple[int, int] | None = None,
    w_scale: float = 1.0, table_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared launcher (arguments validated by the public wrappers). Returns (topk_idx, scores).
    `table_rows`: `[n_q]` int32, the block-table row of each query (default: row i for query i)."""
    n_q, n_heads, c = q.shape
    key_fmt, epp, page_bytes = _key_geometry(keys, c, key_format)
    if out is None:
        out = torch.empty(n_q, topk, dtype=torch.int32, device=q.device)
    assert out.shape == (n_q, topk) and out.dtype == torch.int32 and out.stride(1) == 1
    cap = max(1, max_visible)
    if scores is None:  # a row stride divisible by 16 whatever the length: one compiled variant for all
        scores = torch.empty(n_q, cdiv(cap, 16) * 16, dtype=torch.float32, device=q.device)[:, :cap]
    assert scores.shape[0] == n_q and scores.shape[1] >= cap and scores.stride(1) == 1
    if n_q == 0 or topk == 0:
        return out, scores
    # one zeroed workspace row per query: 4 x 256 histogram bins, then two spare counters
    ws = torch.zeros(n_q, WS_INTS, dtype=torch.int32, device=q.device)
    dtype = dot_dtype(q.dtype)
    on_gpu = q.device.type == "cuda"
    # fixed, not chosen by the batch: a query's scores must not depend on what shares its launch
    # (H200: 128-key tiles 66 us at batch 1 over 256K candidates, 64-key tiles 76 us)
    block_n, score_warps = launch or ((128, 4) if on_gpu else (16, 1))
    sms = num_sms(q.device)
    score_progs = max(1, min(cdiv(cap, block_n), cdiv(2 * sms, n_q)))
    keys_f32 = keys.view(torch.float32) if key_fmt == 1 else keys
    indexer_score_kernel[(n_q, score_progs)](
        q, w, w_scale, keys, keys_f32, block_table, bt_stride, table_rows if table_rows is not None else num_visible,
        num_visible, scores, ws, q.stride(0), q.stride(1), w.stride(0), scores.stride(0), epp, page_bytes,
        N_HEADS=n_heads, C=c, KEY_FMT=key_fmt, BLOCK_N=block_n, BLOCK_HI=max(16, next_pow2(n_heads)),
        DTYPE=dtype, DOT_PRECISION="ieee" if dtype == tl.float32 else "tf32", ROW_MAP=table_rows is not None,
        num_warps=score_warps,
    )
    block = 1024 if on_gpu else 64
    sel_progs = max(1, min(cdiv(cap, block), cdiv(2 * sms, n_q)))
    for level in range(1, NUM_LEVELS):
        indexer_radix_kernel[(n_q, sel_progs)](
            scores, ws, num_visible, scores.stride(0), topk, LEVEL=level, BLOCK=block, num_warps=4,
        )
    # at least TILES_MIN: one compiled variant up to a million tokens, not one per power of two
    tiles_p2 = max(TILES_MIN, next_pow2(cdiv(cap, block)))
    counts = torch.empty(n_q, 2, tiles_p2, dtype=torch.int32, device=q.device)
    indexer_count_kernel[(n_q, sel_progs)](
        scores, ws, num_visible, counts, scores.stride(0), topk, BLOCK=block, TILES_P2=tiles_p2, num_warps=4,
    )
    indexer_select_kernel[(n_q, sel_progs)](
        scores, ws, num_visible, counts, out, scores.stride(0), out.stride(0), topk, BLOCK=block, TILES_P2=tiles_p2,
        num_warps=4,
    )
    return out, scores


def _check_common(q: torch.Tensor, w: torch.Tensor, topk: int) -> None:
    check_dtype("q", q, torch.float32, torch.bfloat16)
    check_dtype("w", w, torch.float32, torch.bfloat16)
    assert q.dim() == 3 and q.stride(2) == 1, f"q must be [*, n_I, c_I] with contiguous rows, got {tuple(q.shape)}"
    assert w.shape == q.shape[:2] and w.stride(1) == 1
    c = q.shape[2]
    assert c >= 32 and c & (c - 1) == 0, f"index dim {c} must be a power of two >= 32"
    assert topk >= 0


def indexer_topk_decode(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    num_visible: torch.Tensor,
    topk: int,
    *,
    key_format: str | None = None,
    out: torch.Tensor | None = None,
    return_scores: bool = False,
    launch: tuple[int, int] | None = None,
    w_scale: float = 1.0,
):
    """Lightning-Indexer top-k for one query token per request.

    Args:
        q: `[B, n_I, c_I]` float32 or bfloat16 index queries (rows contiguous; rotated like the keys).
        w: `[B, n_I]` float32/bfloat16 head weights (rows may be strided), multiplied by `w_scale` in float32.
        keys: index-key pool `[num_blocks, E, c_I]` float32/bfloat16, or uint8 pages `[num_blocks, E * entry_bytes]`
            in `key_format` 'fp8' (132 B for c_I 128) or 'fp4' (68 B), plane layout of `kv_format`.
        block_table: `[B, max_blocks]` int32; entry i of request b is row `i % E` of block `block_table[b, i // E]`.
        num_visible: `[B]` int32, entries 0..num_visible-1 are candidates (<= max_blocks * E).
        topk: K.
        out: optional `[B, K]` int32 output.
        return_scores: also return the float32 scores `[B, max_blocks * E]` (valid below num_visible).
        launch: (BLOCK_N, num_warps) of the scoring kernel instead of the default (tuning).

    Returns:
        `[B, K]` int32: the indices of the min(K, num_visible) largest scores
        `sum_h w_h * relu(q_h . k_i)` in increasing order (ties at the k-th score go to the lowest
        indices), then -1. (And the scores if asked.)
    """
    _check_common(q, w, topk)
    b_size = q.shape[0]
    check_dtype("block_table", block_table, torch.int32)
    check_dtype("num_visible", num_visible, torch.int32)
    assert block_table.dim() == 2 and block_table.shape[0] == b_size and block_table.stride(1) == 1
    assert num_visible.shape == (b_size,)
    check_contiguous(num_visible=num_visible)
    _, epp, _ = _key_geometry(keys, q.shape[2], key_format)
    idx, scores = indexer_topk(q, w, keys, block_table, block_table.stride(0), num_visible, topk,
                               block_table.shape[1] * epp, key_format, out=out, launch=launch, w_scale=w_scale)
    return (idx, scores) if return_scores else idx


def indexer_topk_prefill_batch(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_tables: torch.Tensor,
    requests: torch.Tensor,
    num_visible: torch.Tensor,
    max_visible: int,
    topk: int,
    *,
    key_format: str | None = None,
    out: torch.Tensor | None = None,
    query_chunk: int | None = None,
    w_scale: float = 1.0,
):
    """Lightning-Indexer top-k for the prompt tokens of several requests (a prefill pass), one launch per
    query chunk.

    Args:
        q: `[T, n_I, c_I]` float32/bfloat16 index queries; w: `[T, n_I]` head weights (times `w_scale`).
        keys, key_format: as in `indexer_topk_decode`.
        block_tables: `[R, max_blocks]` int32, row r request r's index-key blocks.
        requests: `[T]` int32, each query's request.
        num_visible: `[T]` int32, entries each query sees (floor((t + 1) / rate) for a query at t).
        max_visible: the largest of them (bounds the score workspace).
        topk: K.  out: optional `[T, K]` int32 output.
        query_chunk: queries per launch (bounds the `[chunk, candidates]` float32 score workspace).

    Returns:
        `[T, K]` int32, per query the indices of its min(K, visible) best entries (any order), then -1.
    """
    _check_common(q, w, topk)
    n_q = q.shape[0]
    check_dtype("block_tables", block_tables, torch.int32)
    check_dtype("requests", requests, torch.int32)
    check_dtype("num_visible", num_visible, torch.int32)
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    assert requests.shape == (n_q,) and num_visible.shape == (n_q,)
    check_contiguous(requests=requests, num_visible=num_visible)
    _, epp, _ = _key_geometry(keys, q.shape[2], key_format)
    if out is None:
        out = torch.empty(n_q, topk, dtype=torch.int32, device=q.device)
    assert out.shape == (n_q, topk) and out.dtype == torch.int32 and out.is_contiguous()
    max_visible = min(max_visible, block_tables.shape[1] * epp)
    if query_chunk is None:
        query_chunk = max(1, min(n_q, (256 << 20) // (4 * max(1, max_visible))))
        if query_chunk >= 16:  # sub-chunks start 16-aligned: the per-query pointers keep one alignment
            query_chunk -= query_chunk % 16
    for s0 in range(0, n_q, query_chunk):
        s1 = min(n_q, s0 + query_chunk)
        indexer_topk(q[s0:s1], w[s0:s1], keys, block_tables, block_tables.stride(0), num_visible[s0:s1], topk,
                     max_visible, key_format, out=out[s0:s1], w_scale=w_scale, table_rows=requests[s0:s1])
    return out


def indexer_topk_prefill(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: int,
    topk: int,
    *,
    rate: int = 4,
    key_format: str | None = None,
    out: torch.Tensor | None = None,
    query_chunk: int | None = None,
    w_scale: float = 1.0,
):
    """Lightning-Indexer top-k for S consecutive query tokens of one request (`indexer_topk_prefill_batch`
    with one request).

    Args:
        q: `[S, n_I, c_I]` float32/bfloat16, queries at positions start_pos .. start_pos + S - 1.
        w: `[S, n_I]` float32/bfloat16 head weights (times `w_scale`).
        keys, key_format: as in `indexer_topk_decode`.
        block_table: `[max_blocks]` int32, the request's index-key blocks.
        start_pos: position of q[0]; query at t sees entries i < (t + 1) // rate.
        topk: K.  rate: compression rate (4).
        out: optional `[S, K]` int32 output.
        query_chunk: queries per launch (bounds the `[chunk, candidates]` float32 score workspace).

    Returns:
        `[S, K]` int32, per query the indices of its min(K, visible) best entries (any order), then -1.
    """
    check_dtype("block_table", block_table, torch.int32)
    assert block_table.dim() == 1 and block_table.is_contiguous()
    s_len = q.shape[0]
    pos = torch.arange(start_pos, start_pos + s_len, device=q.device, dtype=torch.int64)
    visible = ((pos + 1) // rate).to(torch.int32)
    requests = torch.zeros(s_len, dtype=torch.int32, device=q.device)
    return indexer_topk_prefill_batch(q, w, keys, block_table[None], requests, visible, (start_pos + s_len) // rate,
                                      topk, key_format=key_format, out=out, query_chunk=query_chunk, w_scale=w_scale)


__all__ = ["indexer_topk_decode", "indexer_topk_prefill", "indexer_topk_prefill_batch"]
