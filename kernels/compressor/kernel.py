"""Compressor: per-channel softmax pooling + RMSNorm + RoPE (+ Hadamard) + quantize + cache insert, one pass.

One kernel serves decode (B requests, one token each) and prefill (R requests, a run of tokens each). For a
request whose chunk covers positions p0 .. p0+T-1 let cur = p0 // rate and end = (p0+T) // rate:
entries cur .. end-1 complete in this chunk and are emitted; the accumulators leave holding
entries end (and end+1 with overlap). Program 0 of a request owns the state: it handles the entries
that start from the incoming accumulators (cur, cur+1) and the ones that become the outgoing
accumulators (end, end+1), reading the state before writing it. Programs 1.. each pool and emit one
entry in between, from the chunk's tokens alone. Pooling streams the tokens in `[BLOCK_T, D]` tiles
through the same (m, s, w) update the state uses, so a window never has to be materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..common import check_contiguous, check_dtype, next_pow2
from ..host_copy import to_device
from ..kv_format.kernel import bf16_rne, quantize_index_store, quantize_main_store
from ..kv_format.layout import IndexLayout, MainLayout

ENTRY_FORMATS = {None: 0, "main_fp8": 1, "index_fp8": 2, "index_fp4": 3}


@triton.jit
def pool_tokens(m, s, w, a_ptr, z_ptr, bias_ptr, row0, p0, lo_pos, hi_pos, col_off, stride_a, stride_z, stride_bias, rate,
                D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Add the tokens at positions [lo_pos, hi_pos) (columns col_off .. col_off + D) into accumulator (m, s, w)."""
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, D)
    for start in range(lo_pos, hi_pos, BLOCK_T):
        pos = start + o_t
        m_t = pos < hi_pos
        row = (row0 + pos - p0).to(tl.int64)
        z = tl.load(z_ptr + row[:, None] * stride_z + col_off + o_d[None, :], mask=m_t[:, None], other=float("-inf"))
        z = z.to(tl.float32) + tl.load(bias_ptr + (pos % rate)[:, None] * stride_bias + col_off + o_d[None, :],
                                       mask=m_t[:, None], other=0.0)
        a = tl.load(a_ptr + row[:, None] * stride_a + col_off + o_d[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet in this channel
        decay = tl.exp(m - m_safe)
        p = tl.exp(z - m_safe[None, :])
        s = s * decay + tl.sum(p, 0)
        w = w * decay + tl.sum(p * a, 0)
        m = m_new
    return m, s, w


@triton.jit
def pool_entry(m, s, w, j, p0, p1, row0, a_ptr, z_ptr, bias_ptr, stride_a, stride_z, stride_bias, rate,
               D: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Add this chunk's tokens (positions [p0, p1)) that feed entry j."""
    own_lo = tl.maximum(rate * j, p0)
    own_hi = tl.minimum(rate * j + rate, p1)
    if OVERLAP:
        m, s, w = pool_tokens(m, s, w, a_ptr, z_ptr, bias_ptr, row0, p0, own_lo, own_hi, D, stride_a, stride_z,
                              stride_bias, rate, D, BLOCK_T)
        prev_lo = tl.maximum(rate * (j - 1), p0)
        prev_hi = tl.minimum(rate * j, p1)
        m, s, w = pool_tokens(m, s, w, a_ptr, z_ptr, bias_ptr, row0, p0, prev_lo, prev_hi, 0, stride_a, stride_z,
                              stride_bias, rate, D, BLOCK_T)
    else:
        m, s, w = pool_tokens(m, s, w, a_ptr, z_ptr, bias_ptr, row0, p0, own_lo, own_hi, 0, stride_a, stride_z,
                              stride_bias, rate, D, BLOCK_T)
    return m, s, w


@triton.jit
def emit_entry(s, w, j, rate, eps, norm_w_ptr, inv_freq_ptr, had_ptr, pool_ptr, pool_bf16_ptr, pool_f32_ptr,
               block_table_ptr, entries_per_page, page_bytes,
               D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr, SS_P2: tl.constexpr,
               ENTRY_FMT: tl.constexpr, HAS_HAD: tl.constexpr):
    """w / s -> RMSNorm -> RoPE at anchor rate*j -> (Hadamard) -> store as entry j through the block table."""
    o_d = tl.arange(0, D)
    y = w / s
    y = y * tl.math.rsqrt(tl.sum(y * y, 0) / D + eps) * tl.load(norm_w_ptr + o_d)
    ev, od = tl.split(tl.reshape(y, [D // 2, 2]))
    o_p = tl.arange(0, D // 2)
    freq = tl.load(inv_freq_ptr + (o_p - NOPE // 2), mask=o_p >= NOPE // 2, other=0.0)
    ang = (rate * j).to(tl.float32) * freq
    c = tl.cos(ang)
    sn = tl.sin(ang)
    y = tl.reshape(tl.join(ev * c - od * sn, ev * sn + od * c), [D])
    if HAS_HAD:
        h = tl.load(had_ptr + o_d[:, None] * D + o_d[None, :])
        y = tl.sum(y[:, None] * h, 0)  # y @ H
    jj = j.to(tl.int64)
    page = tl.load(block_table_ptr + jj // entries_per_page).to(tl.int64)
    row = jj % entries_per_page
    if ENTRY_FMT == 0:
        dst = pool_ptr + (page * entries_per_page + row) * D + o_d
        if pool_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(dst, bf16_rne(y))
        else:
            tl.store(dst, y.to(pool_ptr.dtype.element_ty))
    else:
        one = tl.arange(0, 1)
        page_base = page * page_bytes + one.to(tl.int64)
        row1 = row + one.to(tl.int64)
        m1 = one == 0
        if ENTRY_FMT == 1:
            quantize_main_store(pool_ptr, pool_bf16_ptr, page_base, row1, m1, tl.reshape(y, [1, D // 64, 64]),
                                entries_per_page, NOPE, ROPE, SCALE_BYTES, D // 64, SS_P2)
        else:
            quantize_index_store(pool_ptr, pool_f32_ptr, page_base, row1, m1, tl.reshape(y, [1, D // 32, 32]),
                                 entries_per_page, D, ENTRY_FMT == 3)


# a prefill pass's tables are as wide as its longest prompt: one compiled variant for every width
@triton.jit(do_not_specialize=["bt_stride"])
def compressor_kernel(
    a_ptr, z_ptr, bias_ptr, norm_w_ptr, inv_freq_ptr, had_ptr,
    state_ptr, state_block_ptr, pos0_ptr, tok_start_ptr, num_tok_ptr,
    pool_ptr, pool_bf16_ptr, pool_f32_ptr, block_table_ptr, bt_stride, entries_per_page, page_bytes,
    stride_a, stride_z, stride_bias, rate, eps,
    D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr, SS_P2: tl.constexpr,
    OVERLAP: tl.constexpr, ENTRY_FMT: tl.constexpr, HAS_HAD: tl.constexpr, BLOCK_T: tl.constexpr,
    DECODE: tl.constexpr,
):
    A: tl.constexpr = 2 if OVERLAP else 1
    i_r = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    o_d = tl.arange(0, D)
    p0 = tl.load(pos0_ptr + i_r)
    if DECODE:  # one token per request, at row i_r of a and z
        n_tok = 1
        row0 = i_r
    else:
        n_tok = tl.load(num_tok_ptr + i_r)
        row0 = tl.load(tok_start_ptr + i_r)
    p1 = p0 + n_tok
    cur = p0 // rate
    end = p1 // rate
    table = block_table_ptr + i_r * bt_stride
    neg_inf = tl.full([D], float("-inf"), dtype=tl.float32)
    zero = tl.zeros([D], dtype=tl.float32)
    if i_p == 0:
        st = state_ptr + tl.load(state_block_ptr + i_r).to(tl.int64) * (A * 3 * D)
        m_in0 = tl.load(st + o_d)
        s_in0 = tl.load(st + D + o_d)
        w_in0 = tl.load(st + 2 * D + o_d)
        if OVERLAP:
            m_in1 = tl.load(st + 3 * D + o_d)
            s_in1 = tl.load(st + 4 * D + o_d)
            w_in1 = tl.load(st + 5 * D + o_d)
        for idx in tl.static_range(2 * A):
            if idx < A:
                j = cur + idx
                handle = j >= 0  # always
            else:
                j = end + (idx - A)
                handle = j >= cur + A  # not already handled from the incoming side
            if handle:
                if idx == 0:
                    m, s, w = m_in0, s_in0, w_in0
                elif idx == 1 and OVERLAP:
                    m, s, w = m_in1, s_in1, w_in1
                else:
                    m, s, w = neg_inf, zero, zero
                m, s, w = pool_entry(m, s, w, j, p0, p1, row0, a_ptr, z_ptr, bias_ptr, stride_a, stride_z, stride_bias,
                                     rate, D, OVERLAP, BLOCK_T)
                if j < end:
                    emit_entry(s, w, j, rate, eps, norm_w_ptr, inv_freq_ptr, had_ptr, pool_ptr, pool_bf16_ptr, pool_f32_ptr,
                               table, entries_per_page, page_bytes, D, NOPE, ROPE, SCALE_BYTES, SS_P2, ENTRY_FMT, HAS_HAD)
                else:
                    dst = st + (j - end) * (3 * D)
                    tl.store(dst + o_d, m)
                    tl.store(dst + D + o_d, s)
                    tl.store(dst + 2 * D + o_d, w)
    else:
        j = cur + A + (i_p - 1)
        if j < end:
            m, s, w = pool_entry(neg_inf, zero, zero, j, p0, p1, row0, a_ptr, z_ptr, bias_ptr, stride_a, stride_z,
                                 stride_bias, rate, D, OVERLAP, BLOCK_T)
            emit_entry(s, w, j, rate, eps, norm_w_ptr, inv_freq_ptr, had_ptr, pool_ptr, pool_bf16_ptr, pool_f32_ptr,
                       table, entries_per_page, page_bytes, D, NOPE, ROPE, SCALE_BYTES, SS_P2, ENTRY_FMT, HAS_HAD)


# ---- host side -------------------------------------------------------------------------------


def _pool_geometry(pool: torch.Tensor, dim: int, rope_dim: int, entry_format: str | None) -> tuple[int, int]:
    """(entries per page, page bytes or 0)."""
    check_contiguous(pool=pool)
    if pool.dtype == torch.uint8:
        assert entry_format in ("main_fp8", "index_fp8", "index_fp4"), "uint8 pools need entry_format"
        assert pool.dim() == 2
        if entry_format == "main_fp8":
            assert rope_dim % 64 == 0, "FP8 main entries need rope_dim % 64 == 0 in the kernels"
            return MainLayout(dim, rope_dim).entries_per_page(pool.shape[1]), pool.shape[1]
        return IndexLayout(dim, entry_format.removeprefix("index_")).entries_per_page(pool.shape[1]), pool.shape[1]
    assert entry_format is None, "entry_format is only for uint8 pools"
    check_dtype("pool", pool, torch.float32, torch.bfloat16)
    assert pool.dim() == 3 and pool.shape[2] == dim, f"pool must be [num_blocks, E, {dim}], got {tuple(pool.shape)}"
    return pool.shape[1], 0


def _launch(a, z, position_bias, norm_weight, rope_inv_freq, state, state_block, pos0, tok_start, num_tok,
            pool, block_table, bt_stride, rate, eps, entry_format, hadamard, num_mid) -> None:
    d = norm_weight.shape[0]
    rope_dim = 2 * rope_inv_freq.shape[0]
    overlap = a.shape[1] == 2 * d
    assert a.shape[1] in (d, 2 * d), f"width_in {a.shape[1]} must be D ({d}) or 2D"
    assert d & (d - 1) == 0 and d >= 64 and 0 < rope_dim <= d, "D must be a power of two >= 64"
    num_acc = 2 if overlap else 1
    assert state.dim() == 4 and state.shape[1:] == (num_acc, 3, d) and state.dtype == torch.float32, \
        f"state must be [num_blocks, {num_acc}, 3, {d}] float32, got {tuple(state.shape)} {state.dtype}"
    assert position_bias.shape == (rate, a.shape[1]) and position_bias.dtype == torch.float32
    check_contiguous(state=state, position_bias=position_bias, norm_weight=norm_weight, rope_inv_freq=rope_inv_freq)
    epp, page_bytes = _pool_geometry(pool, d, rope_dim, entry_format)
    if hadamard is not None:
        assert hadamard.shape == (d, d) and hadamard.dtype == torch.float32 and hadamard.is_contiguous()
    scale_bytes = MainLayout(d, rope_dim).scale_bytes if entry_format == "main_fp8" else 8
    u8 = pool.dtype == torch.uint8
    compressor_kernel[(pos0.shape[0], 1 + num_mid)](
        a, z, position_bias, norm_weight, rope_inv_freq, hadamard if hadamard is not None else norm_weight,
        state, state_block, pos0, tok_start if tok_start is not None else pos0, num_tok if num_tok is not None else pos0,
        pool, pool.view(torch.bfloat16) if u8 else pool, pool.view(torch.float32) if u8 else pool,
        block_table, bt_stride, epp, page_bytes,
        a.stride(0), z.stride(0), position_bias.stride(0), rate, eps,
        D=d, NOPE=d - rope_dim, ROPE=rope_dim, SCALE_BYTES=scale_bytes, SS_P2=next_pow2(scale_bytes),
        OVERLAP=overlap, ENTRY_FMT=ENTRY_FORMATS[entry_format], HAS_HAD=hadamard is not None,
        BLOCK_T=8 if overlap else 16, DECODE=tok_start is None, num_warps=4,
    )


def _check_tokens(a: torch.Tensor, z: torch.Tensor) -> None:
    check_dtype("a", a, torch.float32, torch.bfloat16)
    check_dtype("z", z, torch.float32, torch.bfloat16)
    assert a.dim() == 2 and a.shape == z.shape and a.stride(1) == 1 and z.stride(1) == 1


def compressor_decode(
    a: torch.Tensor,
    z: torch.Tensor,
    position_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_inv_freq: torch.Tensor,
    state: torch.Tensor,
    state_block: torch.Tensor,
    positions: torch.Tensor,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    *,
    rate: int,
    eps: float = 1e-6,
    entry_format: str | None = None,
    hadamard: torch.Tensor | None = None,
) -> None:
    """One decode token per request through the compressor; emits an entry where (t + 1) % rate == 0. In place.

    Args:
        a, z: `[B, width_in]` float32/bfloat16, the token's projected kv and gate (position bias NOT added);
            width_in = 2D with overlap (CSA: first half feeds the next entry, second half the current one) or D (HCA).
        position_bias: `[rate, width_in]` float32, added to z at row t % rate.
        norm_weight: `[D]` float32 RMSNorm weight (D a power of two).
        rope_inv_freq: `[R/2]` float32; entry i is rotated at anchor position rate * i (interleaved, last R dims).
        state: `[num_state_blocks, A, 3, D]` float32 accumulators (A = 2 overlap, else 1; rows m, s, w; empty =
            (-inf, 0, 0)); slot 0 builds entry t // rate. Updated in place.
        state_block: `[B]` int32, each request's state block.
        positions: `[B]` int64 token positions t.
        pool: entries `[num_blocks, E, D]` float32/bfloat16, or uint8 pages `[num_blocks, E * entry_bytes]` of
            `entry_format` ('main_fp8', 'index_fp8', 'index_fp4'); entry i goes to row i % E of block
            `block_table[b, i // E]`.
        block_table: `[B, max_blocks]` int32.
        rate: tokens per entry (4 CSA, 128 HCA).  eps: RMSNorm epsilon.
        hadamard: optional `[D, D]` float32 rotation applied after RoPE (index keys before FP4/FP8).
    """
    _check_tokens(a, z)
    b_size = a.shape[0]
    check_dtype("positions", positions, torch.int64)
    check_dtype("state_block", state_block, torch.int32)
    check_dtype("block_table", block_table, torch.int32)
    assert positions.shape == (b_size,) and state_block.shape == (b_size,)
    assert block_table.dim() == 2 and block_table.shape[0] == b_size and block_table.stride(1) == 1
    if b_size == 0:
        return
    _launch(a, z, position_bias, norm_weight, rope_inv_freq, state, state_block, positions, None, None,
            pool, block_table, block_table.stride(0), rate, eps, entry_format, hadamard, num_mid=0)


class PrefillSpans(NamedTuple):
    """Several requests' token runs laid end to end in one `[T, width_in]` batch (`compressor_prefill_batch`).
    Built once per prefill pass: every compressor of every layer reads the same spans."""

    host: tuple[tuple[int, int], ...]  # (first position, tokens) per request
    state_blocks: torch.Tensor  # [R] int32
    starts: torch.Tensor  # [R] int64 first positions
    offsets: torch.Tensor  # [R] int64 first rows in the batch
    counts: torch.Tensor  # [R] int64 tokens

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int]], state_blocks: Sequence[int], device) -> PrefillSpans:
        offsets = [0]
        for _, n in spans[:-1]:
            offsets.append(offsets[-1] + n)
        columns = to_device([v for column in ([a for a, _ in spans], offsets, [n for _, n in spans]) for v in column],
                            torch.int64, device).view(3, len(spans))
        return cls(tuple((int(a), int(n)) for a, n in spans), to_device(list(state_blocks), torch.int32, device),
                   columns[0], columns[1], columns[2])

    def middle_entries(self, rate: int, num_acc: int) -> int:
        """The most entries one request emits beyond the ones its state program handles."""
        return max(max(0, (a + n) // rate - a // rate - num_acc) for a, n in self.host)


def compressor_prefill_batch(
    a: torch.Tensor,
    z: torch.Tensor,
    position_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_inv_freq: torch.Tensor,
    state: torch.Tensor,
    spans: PrefillSpans,
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    rate: int,
    eps: float = 1e-6,
    entry_format: str | None = None,
    hadamard: torch.Tensor | None = None,
) -> None:
    """Consecutive tokens of several requests through the compressor in one launch, in place.

    Each request's run (`spans`) emits every entry whose window completes in it and leaves its
    accumulators for the rest, exactly as `compressor_prefill` on that run alone.
    a, z: `[T, width_in]`, the runs end to end; block_tables: `[R, max_blocks]` int32, row r request r's;
    everything else as in `compressor_decode`.
    """
    _check_tokens(a, z)
    check_dtype("block_tables", block_tables, torch.int32)
    r = len(spans.host)
    assert block_tables.dim() == 2 and block_tables.shape[0] == r and block_tables.stride(1) == 1
    assert a.shape[0] == sum(n for _, n in spans.host), "the spans must cover a's rows"
    if a.shape[0] == 0:
        return
    num_acc = 2 if a.shape[1] == 2 * norm_weight.shape[0] else 1
    _launch(a, z, position_bias, norm_weight, rope_inv_freq, state, spans.state_blocks, spans.starts, spans.offsets,
            spans.counts, pool, block_tables, block_tables.stride(0), rate, eps, entry_format, hadamard,
            num_mid=spans.middle_entries(rate, num_acc))


def compressor_prefill(
    a: torch.Tensor,
    z: torch.Tensor,
    position_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_inv_freq: torch.Tensor,
    state: torch.Tensor,
    state_block: int,
    start_pos: int,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    *,
    rate: int,
    eps: float = 1e-6,
    entry_format: str | None = None,
    hadamard: torch.Tensor | None = None,
) -> None:
    """T consecutive tokens of one request (positions start_pos ..) through the compressor, in place.

    Emits every entry whose window completes in the chunk and leaves the accumulators for the rest.
    a, z: `[T, width_in]`; block_table: `[max_blocks]` int32 of the request; state_block: its state block;
    everything else as in `compressor_decode`.
    """
    _check_tokens(a, z)
    check_dtype("block_table", block_table, torch.int32)
    assert block_table.dim() == 1 and block_table.is_contiguous()
    if a.shape[0] == 0:
        return
    spans = PrefillSpans.build([(start_pos, a.shape[0])], [state_block], a.device)
    compressor_prefill_batch(a, z, position_bias, norm_weight, rope_inv_freq, state, spans, pool, block_table[None],
                             rate=rate, eps=eps, entry_format=entry_format, hadamard=hadamard)


__all__ = ["PrefillSpans", "compressor_decode", "compressor_prefill", "compressor_prefill_batch"]
