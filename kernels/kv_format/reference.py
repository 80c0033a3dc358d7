"""Float32 torch ground truth for the KV storage formats (layouts in `layout.py`).

Every `ceil(log2(v))` is taken exactly from the float32 value (frexp), so references and kernels
agree bit for bit: the scale of a group is a function of the float32 number `max(amax, floor) / max`.
"""

from __future__ import annotations

import math

import torch

from .layout import (
    FP4_GROUP,
    FP4_MAX,
    FP4_SCALE_FLOOR,
    FP8_MAX,
    INDEX_FP8_SCALE_FLOOR,
    MAIN_GROUP,
    MAIN_SCALE_FLOOR,
    UE8M0_BIAS,
    IndexLayout,
    MainLayout,
)

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix `[n, n]` (n a power of two): symmetric, orthogonal, entries ±n^-1/2."""
    assert n >= 1 and n & (n - 1) == 0, f"Hadamard size {n} is not a power of two"
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c correctly rounded on every device (CUDA torch turns division by a Python scalar into a
    multiplication by its reciprocal, which can differ in the last bit)."""
    return x / torch.full_like(x, c)


def pow2_ceil_exponent(v: torch.Tensor) -> torch.Tensor:
    """`ceil(log2(v))` for positive float32 `v`, exactly: v = m * 2^e with m in [0.5, 1)."""
    m, e = torch.frexp(v.float())
    return torch.where(m == 0.5, e - 1, e).to(torch.int32)


def e4m3_bits(y: torch.Tensor) -> torch.Tensor:
    """Float32 `y` (|y| <= 448) to e4m3 bit patterns, round to nearest even."""
    return y.float().to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_values(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float8_e4m3fn).float()


def e2m1_bits(y: torch.Tensor) -> torch.Tensor:
    """Float32 `y` (already divided by its scale) to e2m1 codes 0..15 (bit 3 = sign), nearest, ties to even code."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=y.device)
    a = y.float().abs().clamp(max=FP4_MAX)
    dist = (a[..., None] - grid).abs()  # [..., 8]
    best = dist == dist.amin(-1, keepdim=True)
    even = (torch.arange(8, device=y.device) % 2 == 0)
    code = torch.argmax(best.int() * 2 + (best & even).int(), dim=-1)  # even candidate wins a tie
    return (code + 8 * torch.signbit(y).long()).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


# ---- main K=V entries ------------------------------------------------------------------------


def quantize_main_ref(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Main entries to FP8: x `[N, D]` float -> `[N, entry_bytes]` uint8 (one entry's planes contiguous)."""
    lay = MainLayout(x.shape[-1], rope_dim)
    n = x.shape[0]
    x = x.float()
    nope = x[:, : lay.nope_dim].reshape(n, lay.num_groups, MAIN_GROUP)  # [N, G, 64]
    amax = nope.abs().amax(-1)  # [N, G]
    k = pow2_ceil_exponent(_div(amax.clamp(min=MAIN_SCALE_FLOOR), FP8_MAX))  # [N, G]
    scale = torch.ldexp(torch.ones_like(amax), k)
    values = e4m3_bits((nope / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)).reshape(n, lay.nope_dim)
    rope = x[:, lay.nope_dim :].to(torch.bfloat16).view(torch.uint8)  # [N, 2R] bytes
    scales = torch.zeros(n, lay.scale_bytes, dtype=torch.uint8, device=x.device)
    scales[:, : lay.num_groups] = (k + UE8M0_BIAS).to(torch.uint8)
    return torch.cat([values, rope, scales], dim=1)


def dequantize_main_ref(packed: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """`[N, entry_bytes]` uint8 -> `[N, head_dim]` float32."""
    lay = MainLayout(head_dim, rope_dim)
    n = packed.shape[0]
    values = e4m3_values(packed[:, : lay.nope_dim].contiguous()).reshape(n, lay.num_groups, MAIN_GROUP)
    rope = packed[:, lay.nope_dim : lay.nope_dim + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    k = packed[:, lay.nope_dim + 2 * rope_dim :][:, : lay.num_groups].to(torch.int32) - UE8M0_BIAS  # [N, G]
    nope = values * torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)[..., None]
    return torch.cat([nope.reshape(n, lay.nope_dim), rope], dim=1)


# ---- index keys ------------------------------------------------------------------------------


def quantize_index_ref(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Index keys x `[N, C]` float -> `[N, entry_bytes]` uint8 in format `fmt` ('fp8' or 'fp4')."""
    IndexLayout(x.shape[-1], fmt)  # checks fmt and the key width
    n, c = x.shape
    x = x.float()
    if fmt == "fp8":
        scale = _div(x.abs().amax(-1).clamp(min=INDEX_FP8_SCALE_FLOOR), FP8_MAX)  # [N] float32
        values = e4m3_bits((x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX))  # [N, C]
        return torch.cat([values, scale[:, None].contiguous().view(torch.uint8)], dim=1)
    groups = x.reshape(n, c // FP4_GROUP, FP4_GROUP)  # [N, C/32, 32]
    k = pow2_ceil_exponent(_div(groups.abs().amax(-1).clamp(min=FP4_SCALE_FLOOR), FP4_MAX))  # [N, C/32]
    codes = e2m1_bits(groups / torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)[..., None]).reshape(n, c)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, C/2], low nibble = even dim
    return torch.cat([packed, (k + UE8M0_BIAS).to(torch.uint8)], dim=1)


def dequantize_index_ref(packed: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    """`[N, entry_bytes]` uint8 -> `[N, dim]` float32."""
    lay = IndexLayout(dim, fmt)
    n = packed.shape[0]
    if fmt == "fp8":
        scale = packed[:, dim:].contiguous().view(torch.float32)  # [N, 1]
        return e4m3_values(packed[:, :dim].contiguous()) * scale
    b = packed[:, : lay.value_bytes]
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(n, dim)  # [N, C]
    k = packed[:, lay.value_bytes :].to(torch.int32) - UE8M0_BIAS  # [N, C/32]
    scale = torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)
    return (e2m1_values(codes).reshape(n, dim // FP4_GROUP, FP4_GROUP) * scale[..., None]).reshape(n, dim)


# ---- pages -----------------------------------------------------------------------------------


def plane_columns(plane_widths: list[int], entries_per_page: int, slots: torch.Tensor) -> torch.Tensor:
    """Byte columns `[N, sum(plane_widths)]` of each entry's planes inside its page."""
    cols, plane_start = [], 0
    for w in plane_widths:
        cols.append(plane_start + slots.long()[:, None] * w + torch.arange(w, device=slots.device))  # [N, w]
        plane_start += entries_per_page * w
    return torch.cat(cols, dim=1)


def scatter_entries_ref(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, packed: torch.Tensor, plane_widths: list[int]) -> None:
    """Write packed entries `[N, sum(plane_widths)]` into pages `[P, E * entry_bytes]` (plane layout), in place."""
    e = pages.shape[1] // sum(plane_widths)
    assert e * sum(plane_widths) == pages.shape[1]
    cols = plane_columns(plane_widths, e, slots)  # [N, entry_bytes]
    pages[page_ids.long()[:, None], cols] = packed


def gather_entries_ref(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, plane_widths: list[int]) -> torch.Tensor:
    """Read `[N, sum(plane_widths)]` packed entries back out of plane-layout pages."""
    e = pages.shape[1] // sum(plane_widths)
    cols = plane_columns(plane_widths, e, slots)
    return pages[page_ids.long()[:, None], cols]


def main_planes(head_dim: int, rope_dim: int) -> list[int]:
    lay = MainLayout(head_dim, rope_dim)
    return [lay.nope_dim, 2 * rope_dim, lay.scale_bytes]


def index_planes(dim: int, fmt: str) -> list[int]:
    lay = IndexLayout(dim, fmt)
    return [lay.value_bytes, lay.scale_bytes]


def write_main_pages_ref(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, rope_dim: int) -> None:
    scatter_entries_ref(pages, page_ids, slots, quantize_main_ref(x, rope_dim), main_planes(x.shape[-1], rope_dim))


def read_main_pages_ref(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    packed = gather_entries_ref(pages, page_ids, slots, main_planes(head_dim, rope_dim))
    return dequantize_main_ref(packed, head_dim, rope_dim)


def write_index_pages_ref(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, fmt: str) -> None:
    scatter_entries_ref(pages, page_ids, slots, quantize_index_ref(x, fmt), index_planes(x.shape[-1], fmt))


def read_index_pages_ref(pages: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    return dequantize_index_ref(gather_entries_ref(pages, page_ids, slots, index_planes(dim, fmt)), dim, fmt)


def _every_entry(num_pages: int, entries: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Page ids and slots of every entry of a pool, page by page."""
    ids = torch.arange(num_pages, device=device).repeat_interleave(entries)
    return ids, torch.arange(entries, device=device).repeat(num_pages)


def dequantize_main_pages_ref(pages: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Whole pool: `[P, E * entry_bytes]` uint8 -> `[P, E, head_dim]` float32 (all entries, garbage included)."""
    p, e = pages.shape[0], MainLayout(head_dim, rope_dim).entries_per_page(pages.shape[1])
    return read_main_pages_ref(pages, *_every_entry(p, e, pages.device), head_dim, rope_dim).reshape(p, e, head_dim)


def dequantize_index_pages_ref(pages: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    """Whole pool: `[P, E * entry_bytes]` uint8 -> `[P, E, dim]` float32."""
    p, e = pages.shape[0], IndexLayout(dim, fmt).entries_per_page(pages.shape[1])
    return read_index_pages_ref(pages, *_every_entry(p, e, pages.device), dim, fmt).reshape(p, e, dim)
