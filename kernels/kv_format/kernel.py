"""Triton kernels for the quantized KV storage formats, plus the device helpers other ops reuse.

Device helpers (called from other kernels):
- `e4m3_encode` / `e2m1_encode`: float32 -> bit patterns, round to nearest even, integer arithmetic
  only, so the interpreter and every GPU give the same bytes as the torch reference;
- `quantize_main_store` / `load_main_fp8`: one tile of main entries to / from plane-layout pages;
- `quantize_index_store` / `load_index_fp8` / `load_index_fp4`: the same for index keys.

Main entries are quantized as `[rows, D/64, 64]` tiles (64-wide groups: groups below `NOPE/64` are the
e4m3 nope dims, the rest the bf16 rope dims), so both nope and rope dims must be multiples of 64; they
are loaded back as plain `[rows, D]` tiles ready for `tl.dot`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_contiguous, check_dtype, cdiv, next_pow2
from .layout import FP4_GROUP, IndexLayout, MainLayout


@triton.jit
def pow2_ceil_exponent(v):
    """`ceil(log2(v))` of positive normal float32 `v`, exactly, as int32."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def exp2i(k):
    """2^k as float32 for int32 `k` in [-126, 127], exactly."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_encode(y):
    """Float32 `y` with |y| <= 448 -> e4m3 bits (uint8), round to nearest even."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # normal range: round the 23-bit mantissa to 3 bits (carry may bump the exponent), rebias 127 -> 7
    lsb = (a_bits >> 20) & 1
    normal = ((a_bits + 0x7FFFF + lsb) >> 20) - (120 << 3)
    # subnormal range (a < 2^-6): units of 2^-9, rounded by one float add at magnitude 2^23
    sub = (a * 512.0 + 8388608.0).to(tl.uint32, bitcast=True) - 0x4B000000
    code = tl.where(a < 0.015625, sub, normal)
    return (sign | code).to(tl.uint8)


@triton.jit
def bf16_rne(x):
    """Float32 -> bfloat16, round to nearest even (done in integers: the interpreter truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_bf16(x, ROUND_BF16: tl.constexpr):
    """Float32 `x` rounded where the bf16 reference rounds (a no-op for a float32 model)."""
    if ROUND_BF16:
        x = bf16_rne(x).to(tl.float32)
    return x


@triton.jit
def e2m1_encode(y):
    """Float32 `y` (already divided by its scale) -> e2m1 code 0..15 (bit 3 = sign), nearest, ties to even code."""
    sign = ((y.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.uint8)
    a = tl.abs(y)
    code = (a > 0.25).to(tl.uint8) + (a >= 0.75).to(tl.uint8) + (a > 1.25).to(tl.uint8) + (a >= 1.75).to(tl.uint8)
    code += (a > 2.5).to(tl.uint8) + (a >= 3.5).to(tl.uint8) + (a > 5.0).to(tl.uint8)
    return sign | code


@triton.jit
def quantize_main_store(
    u8_ptr, bf16_ptr, page_base, row, m_r, x3, entries_per_page,
    NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr, DG_P2: tl.constexpr, SS_P2: tl.constexpr,
):
    """Quantize rows `x3 [R, DG_P2, 64]` (float32, groups beyond D/64 ignored) into FP8 main pages.

    `page_base [R]` int64 byte offset of each row's page, `row [R]` int64 slot in the page, `m_r [R]` mask.
    """
    NG: tl.constexpr = NOPE // 64
    RG: tl.constexpr = ROPE // 64
    o_g = tl.arange(0, DG_P2)
    o_c = tl.arange(0, 64)
    m_nope = o_g < NG
    m_rope = (o_g >= NG) & (o_g < NG + RG)
    amax = tl.max(tl.abs(x3), axis=2)  # [R, DG_P2]
    k = pow2_ceil_exponent(tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0))
    y = x3 * exp2i(-k)[:, :, None]
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    q = e4m3_encode(y)
    col3 = o_g[:, None] * 64 + o_c[None, :]  # [DG_P2, 64]
    m3 = m_r[:, None, None] & m_nope[None, :, None]
    tl.store(u8_ptr + page_base[:, None, None] + row[:, None, None] * NOPE + col3[None, :, :], q, mask=m3)
    # rope dims keep bf16 (round to nearest even)
    rope_el = (page_base + entries_per_page * NOPE) // 2 + row * ROPE  # [R] element offset in the bf16 view
    rcol3 = (o_g[:, None] - NG) * 64 + o_c[None, :]
    m3r = m_r[:, None, None] & m_rope[None, :, None]
    tl.store(bf16_ptr + rope_el[:, None, None] + rcol3[None, :, :], bf16_rne(x3), mask=m3r)
    # scale slot: ue8m0 bytes for the NG groups, zeros for the padding
    s_base = page_base + entries_per_page * (NOPE + 2 * ROPE) + row * SCALE_BYTES  # [R]
    tl.store(u8_ptr + s_base[:, None] + o_g[None, :], (k + 127).to(tl.uint8), mask=m_r[:, None] & m_nope[None, :])
    o_s = tl.arange(0, SS_P2)
    zeros = tl.zeros([SS_P2], dtype=tl.uint8)
    tl.store(u8_ptr + s_base[:, None] + o_s[None, :], zeros[None, :], mask=m_r[:, None] & ((o_s >= NG) & (o_s < SCALE_BYTES))[None, :])


@triton.jit
def load_main_fp8(
    u8_ptr, bf16_ptr, page_base, row, m_r, entries_per_page,
    D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """Dequantize FP8 main entries -> `[R, D]` in OUT_DTYPE (exact in bf16 and float32). Masked rows read as 0.

    Built as one 2D tile (each dim reads its group's scale byte; neighbours share the address) so the
    result feeds `tl.dot` without a reshape.
    """
    o_d = tl.arange(0, D)
    is_nope = (o_d < NOPE)[None, :]
    m2 = m_r[:, None] & is_nope
    v = tl.load(u8_ptr + page_base[:, None] + row[:, None] * NOPE + o_d[None, :], mask=m2, other=0)
    sb = tl.load(u8_ptr + page_base[:, None] + entries_per_page * (NOPE + 2 * ROPE) + row[:, None] * SCALE_BYTES
                 + (o_d // 64)[None, :], mask=m2, other=127)
    scale = exp2i(sb.to(tl.int32) - 127).to(OUT_DTYPE)  # powers of two: exact in bf16
    nope = v.to(tl.float8e4nv, bitcast=True).to(OUT_DTYPE) * scale
    rope_el = (page_base + entries_per_page * NOPE) // 2 + row * ROPE
    r = tl.load(bf16_ptr + rope_el[:, None] + (o_d - NOPE)[None, :], mask=m_r[:, None] & (~is_nope), other=0.0)
    return tl.where(is_nope, nope, r.to(OUT_DTYPE))


@triton.jit
def quantize_index_store(
    u8_ptr, f32_ptr, page_base, row, m_r, x3, entries_per_page, C: tl.constexpr, FP4: tl.constexpr,
):
    """Quantize index keys `x3 [R, C/32, 32]` (float32) into FP8 or FP4 index pages."""
    G: tl.constexpr = C // 32
    o_g = tl.arange(0, G)
    o_c = tl.arange(0, 32)
    m2 = m_r[:, None]
    if FP4:
        amax = tl.max(tl.abs(x3), axis=2)  # [R, G]
        k = pow2_ceil_exponent(tl.math.div_rn(tl.maximum(amax, 6.0 * 2.0**-126), 6.0))
        codes = e2m1_encode(x3 * exp2i(-k)[:, :, None])  # [R, G, 32]
        lo, hi = tl.split(tl.reshape(codes, [codes.shape[0], C // 2, 2]))
        packed = lo | (hi << 4)  # [R, C/2]
        o_b = tl.arange(0, C // 2)
        tl.store(u8_ptr + page_base[:, None] + row[:, None] * (C // 2) + o_b[None, :], packed, mask=m2)
        s_base = page_base + entries_per_page * (C // 2) + row * G
        tl.store(u8_ptr + s_base[:, None] + o_g[None, :], (k + 127).to(tl.uint8), mask=m2)
    else:
        amax = tl.max(tl.max(tl.abs(x3), axis=2), axis=1)  # [R]
        s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
        y = tl.math.div_rn(x3, s[:, None, None])
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        col3 = o_g[:, None] * 32 + o_c[None, :]
        tl.store(u8_ptr + page_base[:, None, None] + row[:, None, None] * C + col3[None, :, :], e4m3_encode(y), mask=m_r[:, None, None])
        tl.store(f32_ptr + (page_base + entries_per_page * C) // 4 + row, s, mask=m_r)


@triton.jit
def load_index_fp8(u8_ptr, f32_ptr, page_base, row, m_r, entries_per_page, C: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """FP8 index keys -> (unscaled e4m3 values `[R, C]` in OUT_DTYPE, float32 scales `[R]`)."""
    o_c = tl.arange(0, C)
    v = tl.load(u8_ptr + page_base[:, None] + row[:, None] * C + o_c[None, :], mask=m_r[:, None], other=0)
    s = tl.load(f32_ptr + (page_base + entries_per_page * C) // 4 + row, mask=m_r, other=0.0)
    return v.to(tl.float8e4nv, bitcast=True).to(OUT_DTYPE), s


@triton.jit
def e2m1_scaled_bits(code, sb):
    """Float32 bits of e2m1 `code` (int32, 0..15) times 2^(sb - 127), `sb` the UE8M0 scale byte (>= 1).

    Exact, and no float arithmetic: an e2m1 value has at most two significant bits, so scaling it by a
    power of two only sets the exponent field (and the one mantissa bit). The only product below the
    normal range, 0.5 * 2^-126, is the subnormal 2^-127. Products of 2^128 and more (scale bytes 253-254
    with the largest codes, which the quantizer never writes for finite keys) are not representable."""
    mag = code & 7
    e = mag >> 1
    exp_field = tl.where(e > 0, sb + e - 1, sb - 1)  # e > 0: 2^(e-1) * (1 + m/2); e == 0: m/2
    mant = tl.where(e > 0, (mag & 1) << 22, 0)
    bits = tl.where(exp_field > 0, (exp_field << 23) | mant, 1 << 22)
    return tl.where(mag == 0, 0, bits) | ((code & 8) << 28)


@triton.jit
def load_index_fp4(u8_ptr, page_base, row, m_r, entries_per_page, C: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """FP4 index keys -> dequantized `[R, C]` in OUT_DTYPE (exact in bf16 and float32).

    Each value byte is loaded once and split into its two dims (low nibble first)."""
    G: tl.constexpr = C // 32
    o_g = tl.arange(0, G)
    o_b = tl.arange(0, 16)
    b = tl.load(u8_ptr + page_base[:, None, None] + row[:, None, None] * (C // 2) + (o_g[:, None] * 16 + o_b[None, :])[None],
                mask=m_r[:, None, None], other=0).to(tl.int32)  # [R, G, 16]: a group's 32 dims
    sb = tl.load(u8_ptr + page_base[:, None] + entries_per_page * (C // 2) + row[:, None] * G + o_g[None, :],
                 mask=m_r[:, None], other=127).to(tl.int32)[:, :, None]
    bits = tl.join(e2m1_scaled_bits(b & 15, sb), e2m1_scaled_bits(b >> 4, sb))  # [R, G, 16, 2]
    return tl.reshape(bits, [bits.shape[0], C]).to(tl.float32, bitcast=True).to(OUT_DTYPE)


# ---- kernels ---------------------------------------------------------------------------------


# n_rows is a prompt chunk's length: one compiled variant for every length
@triton.jit(do_not_specialize=["n_rows"])
def write_main_entries_kernel(
    x_ptr, u8_ptr, bf16_ptr, page_ids_ptr, slots_ptr, n_rows, stride_x, page_bytes, entries_per_page,
    D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr,
    DG_P2: tl.constexpr, SS_P2: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    page = tl.load(page_ids_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    row = tl.load(slots_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    o_g = tl.arange(0, DG_P2)
    o_c = tl.arange(0, 64)
    col3 = o_g[:, None] * 64 + o_c[None, :]
    m3 = m_r[:, None, None] & (col3 < D)[None, :, :]
    x3 = tl.load(x_ptr + o_r.to(tl.int64)[:, None, None] * stride_x + col3[None, :, :], mask=m3, other=0.0).to(tl.float32)
    quantize_main_store(u8_ptr, bf16_ptr, page * page_bytes, row, m_r, x3, entries_per_page,
                        NOPE, ROPE, SCALE_BYTES, DG_P2, SS_P2)


@triton.jit(do_not_specialize=["n_rows"])
def read_main_entries_kernel(
    out_ptr, u8_ptr, bf16_ptr, page_ids_ptr, slots_ptr, n_rows, page_bytes, entries_per_page,
    D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    page = tl.load(page_ids_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    row = tl.load(slots_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    k = load_main_fp8(u8_ptr, bf16_ptr, page * page_bytes, row, m_r, entries_per_page, D, NOPE, ROPE, SCALE_BYTES, tl.float32)
    o_d = tl.arange(0, D)
    tl.store(out_ptr + o_r.to(tl.int64)[:, None] * D + o_d[None, :], k, mask=m_r[:, None])


@triton.jit
def write_index_entries_kernel(
    x_ptr, u8_ptr, f32_ptr, page_ids_ptr, slots_ptr, n_rows, stride_x, page_bytes, entries_per_page,
    C: tl.constexpr, FP4: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    page = tl.load(page_ids_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    row = tl.load(slots_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    o_g = tl.arange(0, C // 32)
    o_c = tl.arange(0, 32)
    col3 = o_g[:, None] * 32 + o_c[None, :]
    x3 = tl.load(x_ptr + o_r.to(tl.int64)[:, None, None] * stride_x + col3[None, :, :], mask=m_r[:, None, None], other=0.0)
    quantize_index_store(u8_ptr, f32_ptr, page * page_bytes, row, m_r, x3.to(tl.float32), entries_per_page, C, FP4)


@triton.jit
def read_index_entries_kernel(
    out_ptr, u8_ptr, f32_ptr, page_ids_ptr, slots_ptr, n_rows, page_bytes, entries_per_page,
    C: tl.constexpr, FP4: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    page = tl.load(page_ids_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    row = tl.load(slots_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    if FP4:
        k = load_index_fp4(u8_ptr, page * page_bytes, row, m_r, entries_per_page, C, tl.float32)
    else:
        v, s = load_index_fp8(u8_ptr, f32_ptr, page * page_bytes, row, m_r, entries_per_page, C, tl.float32)
        k = v * s[:, None]
    o_c = tl.arange(0, C)
    tl.store(out_ptr + o_r.to(tl.int64)[:, None] * C + o_c[None, :], k, mask=m_r[:, None])


# ---- host wrappers ---------------------------------------------------------------------------


def _check_main(head_dim: int, rope_dim: int) -> MainLayout:
    lay = MainLayout(head_dim, rope_dim)
    assert rope_dim % 64 == 0, f"kernels need rope_dim a multiple of 64, got {rope_dim}"
    return lay


def _check_pages(pages: torch.Tensor, entry_bytes: int) -> int:
    check_dtype("pages", pages, torch.uint8)
    assert pages.dim() == 2, f"pages must be [num_pages, E * {entry_bytes}] uint8, got {tuple(pages.shape)}"
    check_contiguous(pages=pages)
    assert pages.shape[1] % entry_bytes == 0, f"page of {pages.shape[1]} B is not a multiple of {entry_bytes} B"
    return pages.shape[1] // entry_bytes


def _check_ids(page_ids: torch.Tensor, slots: torch.Tensor, n: int) -> None:
    check_dtype("page_ids", page_ids, torch.int32, torch.int64)
    check_dtype("slots", slots, torch.int32, torch.int64)
    assert page_ids.shape == (n,) and slots.shape == (n,), (page_ids.shape, slots.shape, n)
    check_contiguous(page_ids=page_ids, slots=slots)


def write_main_entries(x: torch.Tensor, pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, rope_dim: int) -> None:
    """Quantize main K=V entries to FP8 and store them into plane-layout pages, in place.

    x: `[N, D]` float32 or bfloat16 (rows contiguous); pages: `[num_pages, E * entry_bytes]` uint8;
    page_ids, slots: `[N]` int32/int64, entry `n` goes to slot `slots[n]` of page `page_ids[n]`.
    """
    check_dtype("x", x, torch.float32, torch.bfloat16)
    assert x.dim() == 2 and x.stride(1) == 1
    lay = _check_main(x.shape[1], rope_dim)
    e = _check_pages(pages, lay.entry_bytes)
    n = x.shape[0]
    _check_ids(page_ids, slots, n)
    if n == 0:
        return
    block_r = 4
    write_main_entries_kernel[(cdiv(n, block_r),)](
        x, pages, pages.view(torch.bfloat16), page_ids, slots, n, x.stride(0), pages.shape[1], e,
        D=lay.head_dim, NOPE=lay.nope_dim, ROPE=rope_dim, SCALE_BYTES=lay.scale_bytes,
        DG_P2=next_pow2(lay.head_dim // 64), SS_P2=next_pow2(lay.scale_bytes), BLOCK_R=block_r,
    )


def _float_out(out: torch.Tensor | None, n: int, dim: int, device: torch.device) -> torch.Tensor:
    """The read kernels' output: the caller's `[n, dim]` float32 buffer, or a new one."""
    if out is None:
        return torch.empty(n, dim, dtype=torch.float32, device=device)
    assert out.shape == (n, dim) and out.dtype == torch.float32 and out.is_contiguous()
    return out


def _one_entry_per_page(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Page ids and slots that treat each row of a packed `[n, entry_bytes]` tensor as a one-entry page."""
    ids = torch.arange(n, dtype=torch.int32, device=device)
    return ids, torch.zeros_like(ids)


def read_main_entries(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, head_dim: int, rope_dim: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize FP8 main entries from pages -> `[N, head_dim]` float32 (`out` if given)."""
    lay = _check_main(head_dim, rope_dim)
    e = _check_pages(pages, lay.entry_bytes)
    n = page_ids.shape[0]
    _check_ids(page_ids, slots, n)
    assert head_dim & (head_dim - 1) == 0, "read kernel needs a power-of-two head_dim"
    out = _float_out(out, n, head_dim, pages.device)
    if n == 0:
        return out
    block_r = 4
    read_main_entries_kernel[(cdiv(n, block_r),)](
        out, pages, pages.view(torch.bfloat16), page_ids, slots, n, pages.shape[1], e,
        D=head_dim, NOPE=lay.nope_dim, ROPE=rope_dim, SCALE_BYTES=lay.scale_bytes, BLOCK_R=block_r,
    )
    return out


def quantize_main_entries(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 main entries, one after another: x `[N, D]` -> `[N, entry_bytes]` uint8 (pages of one entry)."""
    lay = MainLayout(x.shape[1], rope_dim)
    packed = torch.empty(x.shape[0], lay.entry_bytes, dtype=torch.uint8, device=x.device)
    write_main_entries(x, packed, *_one_entry_per_page(x.shape[0], x.device), rope_dim)
    return packed


def dequantize_main_entries(packed: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """`[N, entry_bytes]` uint8 -> `[N, head_dim]` float32."""
    return read_main_entries(packed, *_one_entry_per_page(packed.shape[0], packed.device), head_dim, rope_dim)


def write_index_entries(x: torch.Tensor, pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, fmt: str) -> None:
    """Quantize index keys to `fmt` ('fp8' or 'fp4') and store them into plane-layout pages, in place.

    x: `[N, C]` float32 or bfloat16 (C a power of two, >= 32; rotate by `hadamard_matrix(C)` first for
    FP4 if the model does); pages: `[num_pages, E * entry_bytes]` uint8; page_ids, slots: `[N]` int.
    """
    check_dtype("x", x, torch.float32, torch.bfloat16)
    assert x.dim() == 2 and x.stride(1) == 1
    c = x.shape[1]
    assert c >= 32 and c & (c - 1) == 0, f"index dim {c} must be a power of two >= 32"
    lay = IndexLayout(c, fmt)
    e = _check_pages(pages, lay.entry_bytes)
    n = x.shape[0]
    _check_ids(page_ids, slots, n)
    if n == 0:
        return
    block_r = 4
    write_index_entries_kernel[(cdiv(n, block_r),)](
        x, pages, pages.view(torch.float32), page_ids, slots, n, x.stride(0), pages.shape[1], e,
        C=c, FP4=fmt == "fp4", BLOCK_R=block_r,
    )


def read_index_entries(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, dim: int, fmt: str,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize index keys from pages -> `[N, dim]` float32 (`out` if given)."""
    lay = IndexLayout(dim, fmt)
    assert dim >= 32 and dim & (dim - 1) == 0
    e = _check_pages(pages, lay.entry_bytes)
    n = page_ids.shape[0]
    _check_ids(page_ids, slots, n)
    out = _float_out(out, n, dim, pages.device)
    if n == 0:
        return out
    block_r = 4
    read_index_entries_kernel[(cdiv(n, block_r),)](
        out, pages, pages.view(torch.float32), page_ids, slots, n, pages.shape[1], e, C=dim, FP4=fmt == "fp4", BLOCK_R=block_r,
    )
    return out


def quantize_index_entries(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Index keys one after another: x `[N, C]` -> `[N, entry_bytes]` uint8."""
    lay = IndexLayout(x.shape[1], fmt)
    packed = torch.empty(x.shape[0], lay.entry_bytes, dtype=torch.uint8, device=x.device)
    write_index_entries(x, packed, *_one_entry_per_page(x.shape[0], x.device), fmt)
    return packed


def dequantize_index_entries(packed: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    """`[N, entry_bytes]` uint8 -> `[N, dim]` float32."""
    return read_index_entries(packed, *_one_entry_per_page(packed.shape[0], packed.device), dim, fmt)


__all__ = [
    "FP4_GROUP",
    "write_main_entries", "read_main_entries", "quantize_main_entries", "dequantize_main_entries",
    "write_index_entries", "read_index_entries", "quantize_index_entries", "dequantize_index_entries",
]
