"""KV storage formats: kernels equal the torch reference bit for bit and stay within the format's error bound."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dsv4.kernels.kv_format import (
    IndexLayout,
    MainLayout,
    dequantize_index_entries,
    dequantize_main_entries,
    hadamard_matrix,
    quantize_index_entries,
    quantize_main_entries,
    read_index_entries,
    read_main_entries,
    write_index_entries,
    write_main_entries,
)
from dsv4.kernels.kv_format import reference as ref
from dsv4.kernels.common import dot_dtype
from dsv4.kernels.kv_format.kernel import bf16_rne, e2m1_encode, e4m3_encode, load_main_fp8
from kernel_checks import DEVICE, REAL_SHAPES, garbage_bytes, make_generator, poison_like

HEAD_DIMS = [(512, 64), (128, 64)] if REAL_SHAPES else [(128, 64), (512, 64)]
ROWS = [0, 1, 63, 129] + ([4096] if REAL_SHAPES else [])


def _wide_range(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Rows spanning magnitudes 1e-7 .. 1e3, a few zero rows and groups, fresh random signs."""
    x = torch.randn(n, d, generator=g) * torch.logspace(-7, 3, max(n, 1))[:n, None]
    if n > 2:
        x[1] = 0.0
        x[2, : d // 2] = 0.0
    return x


@triton.jit
def _encode_kernel(x_ptr, out8_ptr, out4_ptr, out16_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.0)
    tl.store(out8_ptr + o, e4m3_encode(x), mask=m)
    tl.store(out4_ptr + o, e2m1_encode(x), mask=m)
    tl.store(out16_ptr + o, bf16_rne(x), mask=m)


def test_scalar_encoders_match_torch_rounding():
    """e4m3 and bf16 encoders equal torch's round-to-nearest-even on every grid point, every midpoint and noise."""
    grid8 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # all finite magnitudes
    mids = (grid8[1:] + grid8[:-1]) / 2
    g = make_generator(1)
    x = torch.cat([grid8, mids, torch.rand(4000, generator=g) * 448, torch.rand(1000, generator=g) * 2**-6])
    x = torch.cat([x, -x])
    grid4 = torch.tensor(ref.E2M1_GRID)
    x4 = torch.cat([grid4, (grid4[1:] + grid4[:-1]) / 2, torch.rand(500, generator=g) * 6])
    x4 = torch.cat([x4, -x4])
    n = max(x.numel(), x4.numel())
    xs = torch.zeros(n)
    xs[: x.numel()] = x
    out8 = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    out4 = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    out16 = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    _encode_kernel[(triton.cdiv(n, 1024),)](xs.to(DEVICE), out8, out4, out16, n, BLOCK=1024)
    assert torch.equal(out8.cpu()[: x.numel()], ref.e4m3_bits(x))
    assert torch.equal(out16.cpu()[: x.numel()].view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    xs4 = torch.zeros(n)
    xs4[: x4.numel()] = x4
    _encode_kernel[(triton.cdiv(n, 1024),)](xs4.to(DEVICE), out8, out4, out16, n, BLOCK=1024)
    assert torch.equal(out4.cpu()[: x4.numel()], ref.e2m1_bits(x4))
    assert torch.equal(ref.e2m1_values(ref.e2m1_bits(grid4)), grid4)


def test_entry_sizes():
    assert MainLayout(512, 64).entry_bytes == 584 and MainLayout(512, 64).scale_bytes == 8
    assert MainLayout(128, 64).entry_bytes == 64 + 128 + 8
    assert IndexLayout(128, "fp8").entry_bytes == 132 and IndexLayout(128, "fp4").entry_bytes == 68


@pytest.mark.parametrize("head_dim,rope_dim", HEAD_DIMS, ids=lambda v: str(v))
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"n{n}")
def test_main_pages_bitwise(head_dim, rope_dim, n):
    g = make_generator(100 + n + head_dim)
    lay = MainLayout(head_dim, rope_dim)
    e, num_pages = 8, max(1, -(-n // 8)) + 3
    x = _wide_range(n, head_dim, g)
    # distinct (page, slot) targets spread over a shuffled pool
    targets = torch.randperm(num_pages * e, generator=g)[:n]
    page_ids, slots = (targets // e).to(torch.int32), (targets % e).to(torch.int32)
    pages0 = garbage_bytes((num_pages, e * lay.entry_bytes), g)
    pages_k, pages_r = pages0.clone(), pages0.cpu().clone()
    write_main_entries(x.to(DEVICE), pages_k, page_ids.to(DEVICE), slots.to(DEVICE), rope_dim)
    ref.write_main_pages_ref(pages_r, page_ids, slots, x, rope_dim)
    assert torch.equal(pages_k.cpu(), pages_r), "written pages differ from the reference (untouched bytes included)"

    out = poison_like((n, head_dim), torch.float32)
    read_main_entries(pages_k, page_ids.to(DEVICE), slots.to(DEVICE), head_dim, rope_dim, out=out)
    back = ref.read_main_pages_ref(pages_r, page_ids, slots, head_dim, rope_dim)
    assert torch.equal(out.cpu(), back)

    # error bound: e4m3 keeps 3 mantissa bits (relative 2^-4 after rounding) down to 2^-6 of the group
    # scale, below that absolute 2^-10 of the scale; rope dims are bf16 (relative 2^-8)
    nope = x[:, : lay.nope_dim].reshape(n, lay.num_groups, 64)
    scale = torch.ldexp(torch.ones(n, lay.num_groups), ref.pow2_ceil_exponent(nope.abs().amax(-1).clamp(min=1e-4) / 448))
    err = (back[:, : lay.nope_dim] - x[:, : lay.nope_dim]).reshape(n, lay.num_groups, 64).abs()
    assert (err <= torch.maximum(2.0**-4 * nope.abs(), 2.0**-10 * scale[..., None])).all()
    assert (scale[..., None] * 448 >= nope.abs()).all(), "a group overflowed its scale"
    rope_err = (back[:, lay.nope_dim :] - x[:, lay.nope_dim :]).abs()
    assert (rope_err <= 2.0**-8 * x[:, lay.nope_dim :].abs()).all()


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"n{n}")
def test_index_pages_bitwise(fmt, n):
    g = make_generator(200 + n)
    dim = 128
    lay = IndexLayout(dim, fmt)
    e, num_pages = 16, max(1, -(-n // 16)) + 2
    x = _wide_range(n, dim, g)
    targets = torch.randperm(num_pages * e, generator=g)[:n]
    page_ids, slots = (targets // e).to(torch.int32), (targets % e).to(torch.int32)
    pages0 = garbage_bytes((num_pages, e * lay.entry_bytes), g)
    pages_k, pages_r = pages0.clone(), pages0.cpu().clone()
    write_index_entries(x.to(DEVICE), pages_k, page_ids.to(DEVICE), slots.to(DEVICE), fmt)
    ref.write_index_pages_ref(pages_r, page_ids, slots, x, fmt)
    assert torch.equal(pages_k.cpu(), pages_r)

    out = poison_like((n, dim), torch.float32)
    read_index_entries(pages_k, page_ids.to(DEVICE), slots.to(DEVICE), dim, fmt, out=out)
    back = ref.read_index_pages_ref(pages_r, page_ids, slots, dim, fmt)
    assert torch.equal(out.cpu(), back)

    err = (back - x).abs()
    if fmt == "fp8":
        # scale = amax/448 (not a power of two): e4m3 rounding of x/s, plus one rounding of the division
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
        assert (err <= torch.maximum(2.0**-4 * x.abs() * (1 + 2**-20), 2.0**-10 * s)).all()
    else:
        # e2m1 grid spacing is 0.5 below 2, 1 below 4, 2 up to 6 (in units of the group scale):
        # error <= max(s/4, |x|/4)
        grp = x.reshape(n, dim // 32, 32)
        s = torch.ldexp(torch.ones(n, dim // 32), ref.pow2_ceil_exponent(grp.abs().amax(-1).clamp(min=6 * 2.0**-126) / 6))
        bound = torch.maximum(s[..., None] / 4, grp.abs() / 4).reshape(n, dim)
        assert (err <= bound).all()


def test_fp4_reads_every_code_at_the_extreme_scales():
    """Every e2m1 code under the smallest scale byte (1: 0.5 * 2^-126 is the subnormal 2^-127), the
    next one, 1.0 and a large one, in both nibbles, read back as the reference decodes them."""
    lay = IndexLayout(128, "fp4")
    codes = torch.arange(16, dtype=torch.uint8).repeat(8)  # [128]: each 32-dim group sees every code twice
    rows = []
    for shift in range(2):  # the codes in the low nibbles, then in the high ones
        values = torch.roll(codes, shift)
        packed = values[0::2] | (values[1::2] << 4)
        rows.append(torch.cat([packed, torch.tensor([1, 2, 127, 250], dtype=torch.uint8)]))
    entries = torch.stack(rows)  # [2, entry_bytes]
    e = 4
    pages = torch.zeros(1, e * lay.entry_bytes, dtype=torch.uint8)
    page_ids, slots = torch.zeros(2, dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32)
    ref.scatter_entries_ref(pages, page_ids, slots, entries, ref.index_planes(128, "fp4"))
    out = read_index_entries(pages.to(DEVICE), page_ids.to(DEVICE), slots.to(DEVICE), 128, "fp4")
    expected = ref.dequantize_index_ref(entries, 128, "fp4")
    assert expected[0, 1].item() == 2.0**-127 and torch.signbit(expected[0, 8])
    assert torch.equal(out.cpu(), expected) and torch.equal(torch.signbit(out.cpu()), torch.signbit(expected))


@pytest.mark.parametrize("kind", ["main", "fp8", "fp4"])
def test_packed_entries_match_reference(kind):
    g = make_generator(7)
    if kind == "main":
        x = _wide_range(33, 512, g)
        packed = quantize_main_entries(x.to(DEVICE), 64).cpu()
        assert torch.equal(packed, ref.quantize_main_ref(x, 64))
        assert torch.equal(dequantize_main_entries(packed.to(DEVICE), 512, 64).cpu(), ref.dequantize_main_ref(packed, 512, 64))
    else:
        x = _wide_range(33, 128, g).to(torch.bfloat16)
        packed = quantize_index_entries(x.to(DEVICE), kind).cpu()
        assert torch.equal(packed, ref.quantize_index_ref(x, kind))
        assert torch.equal(dequantize_index_entries(packed.to(DEVICE), 128, kind).cpu(), ref.dequantize_index_ref(packed, 128, kind))


@pytest.mark.parametrize("n", [1, 2, 32, 128])
def test_hadamard(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))
    g = make_generator(n)
    a, b = torch.randn(3, n, generator=g, dtype=torch.float64), torch.randn(5, n, generator=g, dtype=torch.float64)
    assert torch.allclose((a @ h) @ (b @ h).T, a @ b.T, atol=1e-10), "rotation must keep dot products"


def test_fp4_error_shrinks_with_hadamard_on_outliers():
    """Rotation spreads an outlier over all dims, so the 32-wide FP4 groups quantize the rest better."""
    g = make_generator(3)
    x = torch.randn(64, 128, generator=g)
    x[:, 5] *= 50.0
    h = hadamard_matrix(128)
    plain = ref.dequantize_index_ref(ref.quantize_index_ref(x, "fp4"), 128, "fp4")
    rot = ref.dequantize_index_ref(ref.quantize_index_ref(x @ h, "fp4"), 128, "fp4") @ h.T
    assert (rot - x).norm() < (plain - x).norm()


@triton.jit
def _load_tile_kernel(out_ptr, u8_ptr, bf16_ptr, page_ids_ptr, slots_ptr, n, page_bytes, epp,
                      D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, SB: tl.constexpr, DTYPE: tl.constexpr,
                      BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    page = tl.load(page_ids_ptr + o, mask=m, other=0).to(tl.int64)
    row = tl.load(slots_ptr + o, mask=m, other=0).to(tl.int64)
    k = load_main_fp8(u8_ptr, bf16_ptr, page * page_bytes, row, m, epp, D, NOPE, ROPE, SB, DTYPE)
    o_d = tl.arange(0, D)
    tl.store(out_ptr + o[:, None].to(tl.int64) * D + o_d[None, :], k.to(tl.float32), mask=m[:, None])


@pytest.mark.parametrize("head_dim", [128, 512])
def test_attention_tile_loader_is_exact_in_bf16(head_dim):
    """The dequantizing tile loader the attention kernels use gives exactly the reference values in bf16."""
    g = make_generator(head_dim)
    lay = MainLayout(head_dim, 64)
    e, num_pages, n = 4, 9, 29
    x = _wide_range(n, head_dim, g)
    targets = torch.randperm(num_pages * e, generator=g)[:n]
    page_ids, slots = (targets // e).to(torch.int32), (targets % e).to(torch.int32)
    pages = garbage_bytes((num_pages, e * lay.entry_bytes), g).cpu()
    ref.write_main_pages_ref(pages, page_ids, slots, x, 64)
    expect = ref.read_main_pages_ref(pages, page_ids, slots, head_dim, 64)
    pages = pages.to(DEVICE)
    out = poison_like((n, head_dim), torch.float32)
    _load_tile_kernel[(triton.cdiv(n, 16),)](
        out, pages, pages.view(torch.bfloat16), page_ids.to(DEVICE), slots.to(DEVICE), n, pages.shape[1], e,
        D=head_dim, NOPE=lay.nope_dim, ROPE=64, SB=lay.scale_bytes, DTYPE=dot_dtype(torch.bfloat16), BLOCK=16,
    )
    bad = (out.cpu() != expect).nonzero()
    assert bad.numel() == 0, f"{len(bad)} values differ, first at {bad[:4].tolist()}: {out.cpu()[tuple(bad[0])]} vs {expect[tuple(bad[0])]}"

