"""Sparse attention over window + compressed K=V entries with a sink and an inverse-RoPE epilogue.

One program owns one query token and a block of `BLOCK_H` heads: the q tile `[BLOCK_H, D]` stays
on chip, every key tile `[BLOCK_N, D]` is loaded (and FP8-dequantized) once and used by all heads
for both products (K = V). Keys are a virtual list per query: `window` ring positions
`t - window + 1 .. t` first, then the compressed entries (the CSA top-k list, or all `num_comp`
visible entries for HCA). Long lists are split over programs (split-K); a combine kernel then
merges the partial softmax states in split order. A query's split boundaries follow from its own
key count alone (`split_plan`), never from the batch, so its result is the same bits in any batch;
a single split is bit-identical to finishing in place, which the program does when no query of
the launch can need a second split.

`sparse_prefill` drives the same kernel with one "request" per query token (its window rows come
from a contiguous tensor instead of a ring).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import cdiv, check_contiguous, check_dtype, dot_dtype, next_pow2
from ..kv_format.kernel import load_main_fp8
from ..kv_format.layout import MainLayout

LOG2E = 1.4426950408889634


@triton.jit
def load_kv_tile(ptr, bf16_ptr, page, row, valid, entries_per_page,
                 IS_FP8: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                 SCALE_BYTES: tl.constexpr, DTYPE: tl.constexpr):
    """Key/value rows `[BLOCK_N, D]` (DTYPE) from a paged pool; `page`, `row` int64 `[BLOCK_N]`."""
    if IS_FP8:
        entry_bytes: tl.constexpr = NOPE + 2 * ROPE + SCALE_BYTES
        page_base = page * (entries_per_page * entry_bytes) + tl.zeros_like(row)  # page may be one scalar
        return load_main_fp8(ptr, bf16_ptr, page_base, row, valid, entries_per_page,
                             D, NOPE, ROPE, SCALE_BYTES, DTYPE)
    o_d = tl.arange(0, D)
    off = (page * entries_per_page + row) * D
    return tl.load(ptr + off[:, None] + o_d[None, :], mask=valid[:, None], other=0.0).to(DTYPE)


@triton.jit
def attend_block(q, k, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step (log2 domain) over key tile k `[BLOCK_N, D]`; `valid [BLOCK_N]` masks keys."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def inverse_rope(o, t, inv_freq_ptr, D: tl.constexpr, NOPE: tl.constexpr):
    """Rotate interleaved pairs of the last D - NOPE dims of o `[BLOCK_H, D]` (float32) by -t * inv_freq."""
    ev, od = tl.split(tl.reshape(o, [o.shape[0], D // 2, 2]))
    o_p = tl.arange(0, D // 2)
    freq = tl.load(inv_freq_ptr + (o_p - NOPE // 2), mask=o_p >= NOPE // 2, other=0.0)  # nope pairs: angle 0
    ang = t.to(tl.float32) * freq
    c = tl.cos(ang)[None, :]
    s = tl.sin(ang)[None, :]
    return tl.reshape(tl.join(ev * c + od * s, od * c - ev * s), [o.shape[0], D])


@triton.jit
def finish_with_sink(m_i, l_i, acc, sink_ptr, o_h, m_h):
    """Fold the value-less sink logit into the denominator and normalise: -> `[BLOCK_H, D]` float32."""
    sink = tl.load(sink_ptr + o_h, mask=m_h, other=0.0) * 1.4426950408889634
    m_f = tl.maximum(m_i, sink)
    a = tl.exp2(m_i - m_f)
    denom = l_i * a + tl.exp2(sink - m_f)
    return acc * (a / denom)[:, None]


# a prefill pass's window rows and tables follow its prompts' lengths: one compiled variant for all of them
@triton.jit(do_not_specialize=["win_rows", "bt_stride"])
def sparse_attn_fwd_kernel(
    q_ptr, o_ptr, acc_ws_ptr, ml_ws_ptr,
    pos_ptr, sink_ptr, inv_freq_ptr,
    win_ptr, win_bf16_ptr, win_page_ptr, win_rows, window,
    comp_ptr, comp_bf16_ptr, block_table_ptr, bt_stride, num_comp_ptr, topk_ptr, topk_stride, num_topk, comp_rows,
    req_ptr, win_lo_ptr, win_base_ptr,
    num_heads, qk_scale, min_split_keys, max_splits, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr,
    WIN_FP8: tl.constexpr, COMP_FP8: tl.constexpr, HAS_COMP: tl.constexpr, HAS_TOPK: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    """VARLEN (prefill of several prompts): query i_b belongs to request req[i_b], whose raw window rows sit
    in the flat `win` from row win_base[req] on, the first of them at position win_lo[req]; its compressed
    entries go through row req of the block tables. Otherwise request i_b reads its ring page win_page[i_b]
    (position p at row p % win_rows) and table row i_b."""
    i_b = tl.program_id(0).to(tl.int64)
    i_hb = tl.program_id(1)
    i_s = tl.program_id(2)
    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < num_heads
    o_d = tl.arange(0, D)

    t = tl.load(pos_ptr + i_b).to(tl.int64)
    if VARLEN:
        req = tl.load(req_ptr + i_b).to(tl.int64)
        table_row = req
        win_page = req * 0
        win_lo = tl.load(win_lo_ptr + req)
        win_base = tl.load(win_base_ptr + req)
    else:
        table_row = i_b
        win_page = tl.load(win_page_ptr + i_b).to(tl.int64)
        win_lo = t * 0  # a ring: every position from 0 on, at row p % win_rows
        win_base = t * 0
    q = tl.load(q_ptr + i_b * stride_qb + o_h[:, None].to(tl.int64) * stride_qh + o_d[None, :], mask=m_h[:, None], other=0.0)
    q = q.to(DTYPE)

    n_comp = 0
    n_visible = 0
    if HAS_COMP:
        n_visible = tl.load(num_comp_ptr + i_b)
        n_comp = num_topk if HAS_TOPK else n_visible
    n_keys = window + n_comp
    keys_per_split, n_split = split_plan(n_keys, min_split_keys, max_splits, BLOCK_N)
    if i_s < n_split:
        sparse_attn_split(
            q, o_h, m_h, t, i_b, i_s, o_ptr, acc_ws_ptr, ml_ws_ptr, sink_ptr, inv_freq_ptr,
            win_ptr, win_bf16_ptr, win_page, win_lo, win_base, win_rows, window,
            comp_ptr, comp_bf16_ptr, block_table_ptr + table_row * bt_stride, topk_ptr, topk_stride, comp_rows,
            n_visible, n_keys, keys_per_split, num_splits, num_heads, qk_scale, stride_ob, stride_oh,
            D, NOPE, ROPE, SCALE_BYTES, WIN_FP8, COMP_FP8, HAS_COMP, HAS_TOPK, SPLIT, BLOCK_H, BLOCK_N, DTYPE,
            DOT_PRECISION,
        )


@triton.jit
def split_plan(n_keys, min_split_keys, max_splits, BLOCK_N: tl.constexpr):
    """(keys per split, splits) of one query: at most max_splits, each >= min_split_keys, in whole tiles."""
    per = tl.cdiv(tl.cdiv(n_keys, max_splits), BLOCK_N) * BLOCK_N
    per = tl.maximum(per, min_split_keys)
    return per, tl.cdiv(n_keys, per)


@triton.jit
def sparse_attn_split(
    q, o_h, m_h, t, i_b, i_s, o_ptr, acc_ws_ptr, ml_ws_ptr, sink_ptr, inv_freq_ptr,
    win_ptr, win_bf16_ptr, win_page, win_lo, win_base, win_rows, window,
    comp_ptr, comp_bf16_ptr, table_ptr, topk_ptr, topk_stride, comp_rows,
    n_visible, n_keys, keys_per_split, num_splits, num_heads, qk_scale, stride_ob, stride_oh,
    D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr,
    WIN_FP8: tl.constexpr, COMP_FP8: tl.constexpr, HAS_COMP: tl.constexpr, HAS_TOPK: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One split [j0, j1) of one query's virtual key list, then its partial state or the finished output."""
    o_d = tl.arange(0, D)
    o_n = tl.arange(0, BLOCK_N)
    j0 = i_s * keys_per_split
    j1 = tl.minimum(j0 + keys_per_split, n_keys)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)

    # window keys: virtual j in [0, window) is position t - window + 1 + j; visible if >= win_lo, whose
    # row is win_base (rows wrap at win_rows: a ring)
    first_pos = t - window + 1
    lo_pos = win_lo
    j_lo = tl.maximum(j0, ((lo_pos - first_pos) // BLOCK_N) * BLOCK_N)  # skip blocks wholly before lo_pos
    j_hi = tl.minimum(j1, window)
    for start in range(j_lo, j_hi, BLOCK_N):
        j = start + o_n
        p = first_pos + j
        valid = (j < j_hi) & (p >= lo_pos)
        row = (win_base + p - lo_pos) % win_rows
        row = tl.where(valid, row, 0)
        k = load_kv_tile(win_ptr, win_bf16_ptr, win_page, row, valid, win_rows, WIN_FP8, D, NOPE, ROPE, SCALE_BYTES, DTYPE)
        m_i, l_i, acc = attend_block(q, k, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    if HAS_COMP:
        c_lo = tl.maximum(j0, window) - window
        c_hi = j1 - window
        for start in range(c_lo, c_hi, BLOCK_N):
            c = start + o_n
            m_c = c < c_hi
            if HAS_TOPK:
                idx = tl.load(topk_ptr + i_b * topk_stride + c, mask=m_c, other=-1)
            else:
                idx = c
            valid = m_c & (idx >= 0) & (idx < n_visible)
            idx = tl.where(valid, idx, 0).to(tl.int64)
            page = tl.load(table_ptr + idx // comp_rows, mask=valid, other=0).to(tl.int64)
            k = load_kv_tile(comp_ptr, comp_bf16_ptr, page, idx % comp_rows, valid, comp_rows,
                             COMP_FP8, D, NOPE, ROPE, SCALE_BYTES, DTYPE)
            m_i, l_i, acc = attend_block(q, k, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    if SPLIT:
        ws = (i_b * num_splits + i_s) * num_heads + o_h.to(tl.int64)  # [BLOCK_H] row of the workspace
        tl.store(acc_ws_ptr + ws[:, None] * D + o_d[None, :], acc, mask=m_h[:, None])
        tl.store(ml_ws_ptr + ws * 2, m_i, mask=m_h)
        tl.store(ml_ws_ptr + ws * 2 + 1, l_i, mask=m_h)
    else:
        o = finish_with_sink(m_i, l_i, acc, sink_ptr, o_h, m_h)
        o = inverse_rope(o, t, inv_freq_ptr, D, NOPE)
        tl.store(o_ptr + i_b * stride_ob + o_h[:, None].to(tl.int64) * stride_oh + o_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=m_h[:, None])


@triton.jit
def sparse_attn_combine_kernel(
    o_ptr, acc_ws_ptr, ml_ws_ptr, pos_ptr, sink_ptr, inv_freq_ptr, num_comp_ptr, num_topk, window,
    num_heads, min_split_keys, max_splits, num_splits, stride_ob, stride_oh,
    D: tl.constexpr, NOPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_COMP: tl.constexpr, HAS_TOPK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_hb = tl.program_id(1)
    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < num_heads
    o_d = tl.arange(0, D)
    n_comp = 0
    if HAS_COMP:
        n_comp = num_topk if HAS_TOPK else tl.load(num_comp_ptr + i_b)
    _, n_split = split_plan(window + n_comp, min_split_keys, max_splits, BLOCK_N)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    for i_s in range(0, n_split):
        ws = (i_b * num_splits + i_s) * num_heads + o_h.to(tl.int64)
        m_s = tl.load(ml_ws_ptr + ws * 2, mask=m_h, other=-1.0e30)
        l_s = tl.load(ml_ws_ptr + ws * 2 + 1, mask=m_h, other=0.0)
        a_s = tl.load(acc_ws_ptr + ws[:, None] * D + o_d[None, :], mask=m_h[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    t = tl.load(pos_ptr + i_b).to(tl.int64)
    o = finish_with_sink(m_i, l_i, acc, sink_ptr, o_h, m_h)
    o = inverse_rope(o, t, inv_freq_ptr, D, NOPE)
    tl.store(o_ptr + i_b * stride_ob + o_h[:, None].to(tl.int64) * stride_oh + o_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=m_h[:, None])


# ---- host side -------------------------------------------------------------------------------


def pool_geometry(pool: torch.Tensor, head_dim: int, rope_dim: int, name: str) -> tuple[bool, int]:
    """(is_fp8, entries per page) of a K=V pool: float `[P, E, D]` or FP8 pages `[P, E * entry_bytes]` uint8."""
    check_contiguous(**{name: pool})
    if pool.dtype == torch.uint8:
        assert pool.dim() == 2, f"{name}: FP8 pages must be [num_blocks, E * entry_bytes], got {tuple(pool.shape)}"
        return True, MainLayout(head_dim, rope_dim).entries_per_page(pool.shape[1])
    check_dtype(name, pool, torch.float32, torch.bfloat16)
    assert pool.dim() == 3 and pool.shape[2] == head_dim, f"{name}: expected [num_blocks, E, {head_dim}], got {tuple(pool.shape)}"
    return False, pool.shape[1]


def _bf16_view(pool: torch.Tensor) -> torch.Tensor:
    return pool.view(torch.bfloat16) if pool.dtype == torch.uint8 else pool


def launch_config(device: torch.device, head_dim: int, num_heads: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) for the attention kernel."""
    block_h = min(64, max(16, next_pow2(num_heads)))
    if device.type != "cuda":
        return block_h, 16, 4, 1
    if head_dim >= 512:
        # measured on an H200 (scripts/bench_kernels.py --sweep): one stage beats 2 or 3 by 1.3-1.7x, as the
        # [64, 512] float32 accumulator leaves no registers for a second buffered key tile
        return block_h, 32, 8, 1
    return block_h, 32, 4, 2


# decode splits: a query's split count follows from its own key count (batch invariance). 128 keys a
# split fills the GPU at batch 1 (640 CSA keys: 5 splits) without flooding the workspace at batch 128
DECODE_SPLIT_KEYS = 128
DECODE_MAX_SPLITS = 8


def sparse_attention(
    q: torch.Tensor, positions: torch.Tensor, sink: torch.Tensor, softmax_scale: float, rope_inv_freq: torch.Tensor,
    win: torch.Tensor, win_page: torch.Tensor, window: int,
    comp: torch.Tensor | None, block_table: torch.Tensor | None, bt_stride: int, num_comp: torch.Tensor | None,
    topk_idx: torch.Tensor | None, max_comp_keys: int, out: torch.Tensor | None, max_splits: int,
    launch: tuple[int, int, int, int] | None = None, min_split_keys: int = DECODE_SPLIT_KEYS,
    varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Shared launcher of `sparse_decode` and `sparse_prefill_batch` (arguments already validated by them).
    `varlen`: (request of each query `[n_q]` int32, first window position `[R]` int64, its row in `win` `[R]`
    int64) for queries of several prompts over one flat window tensor (the kernel's VARLEN)."""
    n_q, num_heads, d = q.shape
    rope_dim = 2 * rope_inv_freq.shape[0]
    lay = MainLayout(d, rope_dim)
    assert rope_dim % 64 == 0 and d & (d - 1) == 0, f"kernels need a power-of-two head_dim and rope_dim % 64 == 0 ({d}, {rope_dim})"
    win_fp8, win_rows = pool_geometry(win, d, rope_dim, "window")
    has_comp = comp is not None
    comp_fp8, comp_rows = pool_geometry(comp, d, rope_dim, "comp") if has_comp else (False, 1)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    assert max_splits >= 1 and min_split_keys >= 1
    if n_q == 0:
        return out
    block_h, block_n, num_warps, num_stages = launch or launch_config(q.device, d, num_heads)
    head_blocks = cdiv(num_heads, block_h)
    max_keys = window + (max_comp_keys if has_comp else 0)
    min_split_keys = cdiv(min_split_keys, block_n) * block_n
    # the most splits any query of this launch can have (queries with fewer skip the rest)
    num_splits = min(max_splits, cdiv(max_keys, min_split_keys))
    split = num_splits > 1
    if split:
        acc_ws = torch.empty(n_q, num_splits, num_heads, d, dtype=torch.float32, device=q.device)
        ml_ws = torch.empty(n_q, num_splits, num_heads, 2, dtype=torch.float32, device=q.device)
    else:
        acc_ws = ml_ws = out  # unused
    dtype = dot_dtype(q.dtype)
    dummy = win_page
    req, win_lo, win_base = varlen if varlen is not None else (dummy, dummy, dummy)
    num_topk = topk_idx.shape[1] if topk_idx is not None else 0
    sparse_attn_fwd_kernel[(n_q, head_blocks, num_splits)](
        q, out, acc_ws, ml_ws,
        positions, sink, rope_inv_freq,
        win, _bf16_view(win), win_page, win_rows, window,
        comp if has_comp else dummy, _bf16_view(comp) if has_comp else dummy,
        block_table if has_comp else dummy, bt_stride, num_comp if has_comp else dummy,
        topk_idx if topk_idx is not None else dummy, topk_idx.stride(0) if topk_idx is not None else 0,
        num_topk, comp_rows, req, win_lo, win_base,
        num_heads, softmax_scale * LOG2E, min_split_keys, max_splits, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        D=d, NOPE=lay.nope_dim, ROPE=rope_dim, SCALE_BYTES=lay.scale_bytes,
        WIN_FP8=win_fp8, COMP_FP8=comp_fp8, HAS_COMP=has_comp, HAS_TOPK=topk_idx is not None,
        SPLIT=split, BLOCK_H=block_h, BLOCK_N=block_n, DTYPE=dtype,
        DOT_PRECISION="ieee" if dtype == tl.float32 else "tf32", VARLEN=varlen is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        combine_h = 16
        sparse_attn_combine_kernel[(n_q, cdiv(num_heads, combine_h))](
            out, acc_ws, ml_ws, positions, sink, rope_inv_freq, num_comp if has_comp else dummy, num_topk, window,
            num_heads, min_split_keys, max_splits, num_splits, out.stride(0), out.stride(1),
            D=d, NOPE=lay.nope_dim, BLOCK_H=combine_h, BLOCK_N=block_n, HAS_COMP=has_comp,
            HAS_TOPK=topk_idx is not None, num_warps=4,
        )
    return out


def sparse_decode(
    q: torch.Tensor,
    positions: torch.Tensor,
    ring: torch.Tensor,
    ring_block: torch.Tensor,
    comp: torch.Tensor | None,
    block_table: torch.Tensor | None,
    num_comp: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_inv_freq: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    max_splits: int = DECODE_MAX_SPLITS,
    min_split_keys: int = DECODE_SPLIT_KEYS,
    launch: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Sparse decode attention: one query token per request over its window ring + compressed entries.

    Args:
        q: `[B, H, D]` float32 or bfloat16, last dim contiguous; RoPE already applied at `positions`.
        positions: `[B]` int64, the query's absolute position t (its own window entry is already stored).
        ring: this layer's window pool, `[num_ring_blocks, W, D]` float32/bfloat16, or FP8 pages
            `[num_ring_blocks, W * entry_bytes]` uint8 (plane layout, `kv_format`); slot = position mod W.
        ring_block: `[B]` int32, each request's ring block. Visible positions max(0, t-W+1) .. t.
        comp: compressed pool `[num_blocks, E, D]` float32/bfloat16 or FP8 pages `[num_blocks, E * entry_bytes]`
            uint8; None for sliding-window-only layers.
        block_table: `[B, max_blocks]` int32, entry i of request b lives in block `block_table[b, i // E]`,
            row `i % E`; entries past the request's blocks may hold any sentinel (never read).
        num_comp: `[B]` int32, compressed entries visible to the query (0 = none).
        topk_idx: `[B, K]` int32 entry indices (CSA; -1 or >= num_comp = skip) or None (HCA: all 0..num_comp-1).
        sink: `[H]` float32 sink logits (one extra denominator term with no value).
        softmax_scale: logit scale (V4: D^-1/2).
        rope_inv_freq: `[R/2]` float32; the output's last R dims (interleaved pairs) are rotated by -t * inv_freq.
        out: optional `[B, H, D]` output buffer (q's dtype).
        max_splits, min_split_keys: split-K plan; a query with n keys gets min(max_splits, ...) splits of at
            least min_split_keys keys (whole key tiles), fixed by n alone so results are batch-invariant.
        launch: (BLOCK_H, BLOCK_N, num_warps, num_stages) instead of the default for this GPU (tuning).

    Returns:
        `[B, H, D]` in q's dtype.
    """
    check_dtype("q", q, torch.float32, torch.bfloat16)
    assert q.dim() == 3 and q.stride(2) == 1, f"q must be [B, H, D] with contiguous rows, got {tuple(q.shape)}"
    b_size, num_heads, d = q.shape
    check_dtype("positions", positions, torch.int64)
    check_dtype("ring_block", ring_block, torch.int32)
    check_dtype("sink", sink, torch.float32)
    check_dtype("rope_inv_freq", rope_inv_freq, torch.float32)
    assert positions.shape == (b_size,) and ring_block.shape == (b_size,) and sink.shape == (num_heads,)
    check_contiguous(positions=positions, ring_block=ring_block, sink=sink, rope_inv_freq=rope_inv_freq)
    rope_dim = 2 * rope_inv_freq.shape[0]
    _, window = pool_geometry(ring, d, rope_dim, "ring")
    max_comp_keys, bt_stride = 0, 0
    if comp is not None:
        assert block_table is not None and num_comp is not None, "comp needs block_table and num_comp"
        check_dtype("block_table", block_table, torch.int32)
        check_dtype("num_comp", num_comp, torch.int32)
        assert block_table.dim() == 2 and block_table.shape[0] == b_size and block_table.stride(1) == 1
        assert num_comp.shape == (b_size,)
        check_contiguous(num_comp=num_comp)
        _, comp_rows = pool_geometry(comp, d, rope_dim, "comp")
        bt_stride = block_table.stride(0)
        if topk_idx is not None:
            check_dtype("topk_idx", topk_idx, torch.int32)
            assert topk_idx.dim() == 2 and topk_idx.shape[0] == b_size and topk_idx.stride(1) == 1
            max_comp_keys = topk_idx.shape[1]
        else:
            max_comp_keys = block_table.shape[1] * comp_rows
    else:
        assert topk_idx is None, "topk_idx without a compressed pool"
    return sparse_attention(
        q, positions, sink, softmax_scale, rope_inv_freq, ring, ring_block, window,
        comp, block_table, bt_stride, num_comp, topk_idx, max_comp_keys, out, max_splits, launch, min_split_keys,
    )


__all__ = ["sparse_decode", "sparse_attention"]
