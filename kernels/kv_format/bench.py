"""GPU benchmark of the storage-format kernels: quantize + insert into pages, and dequantizing reads."""

from __future__ import annotations

import torch

from ..benchmarking import BenchRow, CheckFailed, ModelShape, bench_device, fits, skipped, time_us
from .kernel import read_index_entries, read_main_entries, write_index_entries, write_main_entries
from .layout import IndexLayout, MainLayout
from .reference import (
    dequantize_main_ref,
    gather_entries_ref,
    index_planes,
    main_planes,
    quantize_index_ref,
    quantize_main_ref,
    scatter_entries_ref,
)


def random_main_pages(num_pages: int, entries: int, head_dim: int, rope_dim: int, device, gen: torch.Generator | None = None) -> torch.Tensor:
    """Valid FP8 main-entry pages `[P, E * entry_bytes]` filled straight from random bytes (no NaN codes)."""
    lay = MainLayout(head_dim, rope_dim)
    pages = torch.empty(num_pages, entries * lay.entry_bytes, dtype=torch.uint8, device=device)
    nope = torch.randint(0, 256, (num_pages, entries * lay.nope_dim), dtype=torch.uint8, device=device, generator=gen)
    pages[:, : entries * lay.nope_dim] = torch.where((nope & 0x7F) == 0x7F, nope ^ 1, nope)
    rope = torch.randn(num_pages, entries * rope_dim, device=device, generator=gen).to(torch.bfloat16)
    pages[:, lay.rope_offset(entries) : lay.scale_offset(entries)] = rope.view(torch.uint8)
    scales = torch.zeros(num_pages, entries, lay.scale_bytes, dtype=torch.uint8, device=device)
    # group scales 2^-9 .. 2^-7: magnitudes like RMS-normed entries (|x| <= 448 * 2^-7 = 3.5)
    scales[:, :, : lay.num_groups] = torch.randint(118, 121, (num_pages, entries, lay.num_groups), dtype=torch.uint8,
                                                   device=device, generator=gen)
    pages[:, lay.scale_offset(entries) :] = scales.view(num_pages, -1)
    return pages


def random_index_pages(num_pages: int, entries: int, dim: int, fmt: str, device, gen: torch.Generator | None = None) -> torch.Tensor:
    """Valid FP8/FP4 index-key pages from random bytes."""
    lay = IndexLayout(dim, fmt)
    pages = torch.empty(num_pages, entries * lay.entry_bytes, dtype=torch.uint8, device=device)
    vals = torch.randint(0, 256, (num_pages, entries * lay.value_bytes), dtype=torch.uint8, device=device, generator=gen)
    if fmt == "fp8":
        pages[:, : entries * dim] = torch.where((vals & 0x7F) == 0x7F, vals ^ 1, vals)
        scale = torch.rand(num_pages, entries, device=device, generator=gen) * 0.01 + 1e-3
        pages[:, entries * dim :] = scale.view(torch.uint8)
    else:
        pages[:, : entries * lay.value_bytes] = vals
        pages[:, entries * lay.value_bytes :] = torch.randint(124, 127, (num_pages, entries * lay.scale_bytes),
                                                             dtype=torch.uint8, device=device, generator=gen)
    return pages


def bench(model: ModelShape, batch: int, context: int) -> list[BenchRow]:
    """Quantize + insert N = batch * min(context, 8192) / 4 main entries and index keys; read them back."""
    dev = bench_device()
    n = batch * min(context, 8192) // 4
    cfg = f"{model.name} N={n}"
    d, r = model.head_dim, model.rope_dim
    lay = MainLayout(d, r)
    e = model.csa_entries
    pages_n = -(-n // e) + 1
    if not fits(dev, n * (d * 4 * 3 + lay.entry_bytes * 3)):
        return [skipped("kv_format", cfg, "does not fit")]
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    x = torch.randn(n, d, device=dev, generator=g).to(torch.bfloat16)
    perm = torch.randperm(pages_n * e, device=dev, generator=g)[:n]
    page_ids, slots = (perm // e).to(torch.int32), (perm % e).to(torch.int32)
    pages = torch.zeros(pages_n, e * lay.entry_bytes, dtype=torch.uint8, device=dev)
    rows = []

    def ref_write():
        scatter_entries_ref(pages, page_ids, slots, quantize_main_ref(x, r), main_planes(d, r))

    write_main_entries(x, pages, page_ids, slots, r)
    expect = torch.zeros_like(pages)
    scatter_entries_ref(expect, page_ids, slots, quantize_main_ref(x, r), main_planes(d, r))
    if not torch.equal(pages, expect):
        raise CheckFailed("write_main_entries differs from the reference bytes")
    us = time_us(lambda: write_main_entries(x, pages, page_ids, slots, r), graph=True)
    rows.append(BenchRow("kv_format.write_main", cfg, us, bytes=n * (d * 2 + lay.entry_bytes + 8), ref_us=time_us(ref_write)))

    out = read_main_entries(pages, page_ids, slots, d, r)
    if not torch.equal(out, dequantize_main_ref(gather_entries_ref(pages, page_ids, slots, main_planes(d, r)), d, r)):
        raise CheckFailed("read_main_entries differs from the reference")
    us = time_us(lambda: read_main_entries(pages, page_ids, slots, d, r, out=out), graph=True)
    ref_us = time_us(lambda: dequantize_main_ref(gather_entries_ref(pages, page_ids, slots, main_planes(d, r)), d, r))
    rows.append(BenchRow("kv_format.read_main", cfg, us, bytes=n * (d * 4 + lay.entry_bytes + 8), ref_us=ref_us))

    c = model.index_dim
    xi = x[:, :c].contiguous()
    for fmt in ("fp8", "fp4"):
        il = IndexLayout(c, fmt)
        ipages = torch.zeros(pages_n, e * il.entry_bytes, dtype=torch.uint8, device=dev)
        write_index_entries(xi, ipages, page_ids, slots, fmt)
        iexpect = torch.zeros_like(ipages)
        scatter_entries_ref(iexpect, page_ids, slots, quantize_index_ref(xi, fmt), index_planes(c, fmt))
        if not torch.equal(ipages, iexpect):
            raise CheckFailed(f"write_index_entries({fmt}) differs from the reference bytes")
        us = time_us(lambda: write_index_entries(xi, ipages, page_ids, slots, fmt), graph=True)
        ref_us = time_us(lambda: scatter_entries_ref(ipages, page_ids, slots, quantize_index_ref(xi, fmt), index_planes(c, fmt)))
        rows.append(BenchRow(f"kv_format.write_index_{fmt}", cfg, us, bytes=n * (c * 2 + il.entry_bytes + 8), ref_us=ref_us))
        us = time_us(lambda: read_index_entries(ipages, page_ids, slots, c, fmt), graph=True)
        rows.append(BenchRow(f"kv_format.read_index_{fmt}", cfg, us, bytes=n * (c * 4 + il.entry_bytes + 8)))
    return rows


def dequant_main_pages_torch(pages: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Plain-torch dequantization of whole FP8 main pages `[..., E * entry_bytes]` -> `[..., E, D]` float32."""
    lay = MainLayout(head_dim, rope_dim)
    e = pages.shape[-1] // lay.entry_bytes
    lead = pages.shape[:-1]
    nope = pages[..., : e * lay.nope_dim].reshape(*lead, e, lay.num_groups, 64).contiguous().view(torch.float8_e4m3fn).float()
    rope = pages[..., lay.rope_offset(e) : lay.scale_offset(e)].contiguous().view(torch.bfloat16).reshape(*lead, e, rope_dim).float()
    k = pages[..., lay.scale_offset(e) :].reshape(*lead, e, lay.scale_bytes)[..., : lay.num_groups].to(torch.int32) - 127
    nope = nope * torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)[..., None]
    return torch.cat([nope.reshape(*lead, e, lay.nope_dim), rope], dim=-1)


def gather_main_entries_torch(pages: torch.Tensor, page_ids: torch.Tensor, rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Plain-torch gather + dequantization of single FP8 main entries: `[M]` page ids and rows -> `[M, D]` float32."""
    lay = MainLayout(head_dim, rope_dim)
    e = pages.shape[1] // lay.entry_bytes
    base = page_ids.long()[:, None] * pages.shape[1]
    r = rows.long()[:, None]
    cols = [r * lay.nope_dim + torch.arange(lay.nope_dim, device=pages.device),
            lay.rope_offset(e) + r * 2 * rope_dim + torch.arange(2 * rope_dim, device=pages.device),
            lay.scale_offset(e) + r * lay.scale_bytes + torch.arange(lay.scale_bytes, device=pages.device)]
    packed = pages.view(-1)[base + torch.cat(cols, dim=1)]  # [M, entry_bytes]
    from .reference import dequantize_main_ref

    return dequantize_main_ref(packed, head_dim, rope_dim)


def dequant_index_pages_torch(pages: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    """Plain-torch dequantization of whole index-key pages `[..., E * entry_bytes]` -> `[..., E, dim]` float32."""
    lay = IndexLayout(dim, fmt)
    e = pages.shape[-1] // lay.entry_bytes
    lead = pages.shape[:-1]
    if fmt == "fp8":
        vals = pages[..., : e * dim].reshape(*lead, e, dim).contiguous().view(torch.float8_e4m3fn).float()
        return vals * pages[..., e * dim :].contiguous().view(torch.float32).reshape(*lead, e, 1)
    from .reference import e2m1_values

    b = pages[..., : e * lay.value_bytes].reshape(*lead, e, dim // 2)
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(*lead, e, dim // 32, 32)
    k = pages[..., e * lay.value_bytes :].reshape(*lead, e, dim // 32).to(torch.int32) - 127
    return (e2m1_values(codes) * torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)[..., None]).reshape(*lead, e, dim)
