"""Compressor: accumulator form == windowed softmax; kernels (decode, prefill) == reference, every storage format."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from dsv4.kernels.compressor import PrefillSpans, compressor_decode, compressor_prefill, compressor_prefill_batch
from dsv4.kernels.compressor import reference as cref
from dsv4.kernels.kv_format import hadamard_matrix
from dsv4.kernels.kv_format import reference as kv_ref
from dsv4.kernels.kv_format.layout import IndexLayout, MainLayout
from kernel_checks import DEVICE, REAL_SHAPES, assert_close, garbage_bytes, make_generator, rope_inv_freq, shuffled_block_table


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    dim: int
    rate: int
    overlap: bool
    entries: int  # per page


if REAL_SHAPES:
    KINDS = {"csa": Kind("csa", 512, 4, True, 64), "hca": Kind("hca", 512, 128, False, 2), "index": Kind("index", 128, 4, True, 64)}
else:
    KINDS = {"csa": Kind("csa", 128, 4, True, 8), "hca": Kind("hca", 128, 16, False, 4), "index": Kind("index", 128, 4, True, 8)}
ROPE = 64
# (kind, pool storage, hadamard)
CASES = [
    ("csa", "fp32", False), ("csa", "bf16", False), ("csa", "main_fp8", False),
    ("hca", "fp32", False), ("hca", "main_fp8", False),
    ("index", "index_fp8", True), ("index", "index_fp4", True), ("index", "fp32", True),
]
LENGTHS = [1, 63, 127, 128, 129, 1000, 1024]


def new_pool(kind: Kind, fmt: str, num_pages: int, g: torch.Generator) -> tuple[torch.Tensor, str | None]:
    """A pool poisoned everywhere: NaN (float) or random bytes (uint8)."""
    if fmt in ("fp32", "bf16"):
        dt = torch.float32 if fmt == "fp32" else torch.bfloat16
        return torch.full((num_pages, kind.entries, kind.dim), float("nan"), dtype=dt, device=DEVICE), None
    if fmt == "main_fp8":
        eb = MainLayout(kind.dim, ROPE).entry_bytes
    else:
        eb = IndexLayout(kind.dim, fmt.removeprefix("index_")).entry_bytes
    return garbage_bytes((num_pages, kind.entries * eb), g), fmt


def weights(kind: Kind, g: torch.Generator):
    width = 2 * kind.dim if kind.overlap else kind.dim
    bias = torch.randn(kind.rate, width, generator=g)
    norm_w = 1 + 0.1 * torch.randn(kind.dim, generator=g)
    return width, bias, norm_w


def history_state(kind: Kind, t: int, bias: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A valid incoming state at position t: the reference fed with random tokens since the open window(s) began."""
    width = bias.shape[1]
    start = max(0, kind.rate * (t // kind.rate - (1 if kind.overlap else 0)))
    a = torch.randn(t - start, width, generator=g)
    z = torch.randn(t - start, width, generator=g) * 2
    _, state = cref.accumulate_tokens_ref(a, z, bias, cref.empty_state_ref(2 if kind.overlap else 1, kind.dim), start, kind.rate)
    return state


def entry_bound(fmt: str, y: torch.Tensor) -> torch.Tensor:
    """Allowed |stored - y| for a finished float entry y `[D]` (format rounding with one scale step of slack)."""
    slack = 1e-4 * float(y.abs().max())
    if fmt == "fp32":
        return torch.full_like(y, 1e-4) + 1e-4 * y.abs()
    if fmt == "bf16":
        return torch.full_like(y, 2e-2) + 2e-2 * y.abs()
    if fmt == "main_fp8":
        nope = y[:-ROPE].reshape(-1, 64)
        s = torch.ldexp(torch.ones(nope.shape[0]), kv_ref.pow2_ceil_exponent(nope.abs().amax(-1).clamp(min=1e-4) / 448))
        b_nope = torch.maximum(2.0**-4 * nope.abs(), 2.0**-9 * s[:, None]).flatten()
        return torch.cat([b_nope, 2.0**-7 * y[-ROPE:].abs()]) + slack
    if fmt == "index_fp8":
        s = y.abs().max() / 448
        return torch.maximum(2.0**-4 * y.abs(), 2.0**-9 * s) + slack
    grp = y.reshape(-1, 32)
    s = torch.ldexp(torch.ones(grp.shape[0]), kv_ref.pow2_ceil_exponent(grp.abs().amax(-1).clamp(min=6 * 2.0**-126) / 6))
    return torch.maximum(s[:, None] / 2, grp.abs() / 4).flatten() + slack


def read_entries(pool: torch.Tensor, fmt: str, dim: int, pages: list[int], rows: list[int]) -> torch.Tensor:
    ids, slots = torch.tensor(pages), torch.tensor(rows)
    pool = pool.cpu()
    if fmt in ("fp32", "bf16"):
        return pool[ids, slots].float()
    if fmt == "main_fp8":
        return kv_ref.read_main_pages_ref(pool, ids, slots, dim, ROPE)
    return kv_ref.read_index_pages_ref(pool, ids, slots, dim, fmt.removeprefix("index_"))


def written_mask(pool: torch.Tensor, fmt: str, dim: int, pages: list[int], rows: list[int]) -> torch.Tensor:
    """Boolean mask over the pool's elements/bytes that the given entries occupy."""
    mask = torch.zeros(pool.shape, dtype=torch.bool)
    if not pages:
        return mask
    if fmt in ("fp32", "bf16"):
        mask[torch.tensor(pages), torch.tensor(rows)] = True
        return mask
    planes = kv_ref.main_planes(dim, ROPE) if fmt == "main_fp8" else kv_ref.index_planes(dim, fmt.removeprefix("index_"))
    cols = kv_ref.plane_columns(planes, pool.shape[1] // sum(planes), torch.tensor(rows))
    mask[torch.tensor(pages)[:, None], cols] = True
    return mask


def check_pool(before: torch.Tensor, after: torch.Tensor, fmt: str, dim: int, written: list[tuple[int, int, torch.Tensor]], what: str):
    """Entries in `written` [(page, row, reference entry)] hold their value; every other element is untouched."""
    pages, rows = [p for p, _, _ in written], [r for _, r, _ in written]
    mask = written_mask(after.cpu(), fmt, dim, pages, rows)
    b, a = before.cpu(), after.cpu()
    if b.dtype.is_floating_point:
        assert torch.equal(torch.nan_to_num(a[~mask], nan=7.0), torch.nan_to_num(b[~mask], nan=7.0)), f"{what}: wrote outside its entries"
    else:
        assert torch.equal(a[~mask], b[~mask]), f"{what}: wrote outside its entries"
    if written:
        got = read_entries(a, fmt, dim, pages, rows)
        for k, (_, _, y) in enumerate(written):
            err = (got[k] - y).abs()
            bound = entry_bound(fmt, y)
            assert torch.isfinite(got[k]).all() and (err <= bound).all(), f"{what}: entry {k} off by {float((err - bound).max()):.3g}"


def check_state(out: torch.Tensor, ref: torch.Tensor, what: str):
    out, ref = out.cpu(), ref.cpu()
    m_o, m_r = out[..., 0, :], ref[..., 0, :]
    assert torch.equal(m_o, m_r), f"{what}: running max differs"
    live = torch.isfinite(m_r)
    for row in (1, 2):
        assert torch.equal(out[..., row, :][~live], ref[..., row, :][~live]), f"{what}: empty accumulator not (0, 0)"
        assert_close(out[..., row, :][live], ref[..., row, :][live], torch.float32, f"{what}: state row {row}")


@pytest.mark.parametrize("overlap", [True, False], ids=["csa", "hca"])
def test_accumulators_equal_windowed_softmax(overlap):
    """The (m, s, w) running form, fed in random chunks, equals a softmax over each full window."""
    kind = KINDS["csa" if overlap else "hca"]
    g = make_generator(1)
    width, bias, _ = weights(kind, g)
    t_len = kind.rate * 9 + 3
    a = torch.randn(t_len, width, generator=g)
    z = torch.randn(t_len, width, generator=g) * 3
    direct = cref.windowed_softmax_pool_ref(a, z, bias, kind.rate, overlap)
    state = cref.empty_state_ref(2 if overlap else 1, kind.dim)
    pooled, pos = [], 0
    for chunk in [1, 2, kind.rate + 1, 7, t_len]:
        chunk = min(chunk, t_len - pos)
        got, state = cref.accumulate_tokens_ref(a[pos : pos + chunk], z[pos : pos + chunk], bias, state, pos, kind.rate)
        pooled += got
        pos += chunk
    assert [j for j, _ in pooled] == list(range(t_len // kind.rate))
    torch.testing.assert_close(torch.stack([p for _, p in pooled]), direct, rtol=1e-5, atol=1e-6)


def _case(kind_name: str, fmt: str, use_had: bool, seed: int):
    kind = KINDS[kind_name]
    g = make_generator(seed)
    width, bias, norm_w = weights(kind, g)
    had = hadamard_matrix(kind.dim).to(DEVICE) if use_had else None
    return kind, g, width, bias, norm_w, had


@pytest.mark.parametrize("kind_name,fmt,use_had", CASES, ids=lambda v: str(v))
def test_compressor_decode(kind_name, fmt, use_had):
    kind, g, width, bias, norm_w, had = _case(kind_name, fmt, use_had, zlib.crc32(f"dec/{kind_name}/{fmt}".encode()))
    b = len(LENGTHS)
    positions = torch.tensor([n - 1 for n in LENGTHS], dtype=torch.int64)
    num_acc = 2 if kind.overlap else 1
    state_pool = torch.full((b + 3, num_acc, 3, kind.dim), float("nan"))
    state_block = torch.randperm(b + 3, generator=g)[:b].to(torch.int32)
    for i, t in enumerate(positions.tolist()):
        state_pool[state_block[i]] = history_state(kind, t, bias, g)
    blocks = [-(-(n // kind.rate) // kind.entries) + 1 for n in LENGTHS]
    pool_pages = sum(blocks) + 3
    table = shuffled_block_table(blocks, max(blocks) + 1, pool_pages, g)
    pool, entry_format = new_pool(kind, fmt, pool_pages, g)
    a = torch.randn(b, width, generator=g)
    z = torch.randn(b, width, generator=g) * 2
    inv = rope_inv_freq(ROPE)

    before = pool.clone()
    state_k = state_pool.clone().to(DEVICE)
    compressor_decode(a.to(DEVICE), z.to(DEVICE), bias.to(DEVICE), norm_w.to(DEVICE), inv, state_k, state_block.to(DEVICE),
                      positions.to(DEVICE), pool, table, rate=kind.rate, entry_format=entry_format, hadamard=had)
    state_r, _, entries = cref.compressor_decode_ref(
        a, z, bias, norm_w, inv.cpu(), state_pool, state_block, positions, before.cpu(), table.cpu(), kind.rate,
        entry_format=entry_format, hadamard=had.cpu() if had is not None else None)
    check_state(state_k[state_block.long().to(DEVICE)], state_r[state_block.long()], f"decode {kind_name}/{fmt}")
    written = []
    for i, ent in enumerate(entries):
        for j, y in ent:
            written.append((int(table[i, j // kind.entries]), j % kind.entries, y))
    assert len(written) == sum((n % kind.rate) == 0 for n in LENGTHS)
    check_pool(before, pool, fmt, kind.dim, written, f"decode {kind_name}/{fmt}")


PREFILL_CHUNKS = [(0, 1), (0, 37), (5, 3), (6, 70), (8, 16), (1000, 129), (1021, 3)]


@pytest.mark.parametrize("kind_name,fmt,use_had", [c for c in CASES if c[1] != "bf16"], ids=lambda v: str(v))
def test_compressor_prefill(kind_name, fmt, use_had):
    kind, g, width, bias, norm_w, had = _case(kind_name, fmt, use_had, zlib.crc32(f"pre/{kind_name}/{fmt}".encode()))
    inv = rope_inv_freq(ROPE)
    num_acc = 2 if kind.overlap else 1
    for start, t_len in PREFILL_CHUNKS:
        if REAL_SHAPES:
            start, t_len = start * 8, t_len * 8 + 1
        state_pool = torch.full((3, num_acc, 3, kind.dim), float("nan"))
        state_pool[1] = history_state(kind, start, bias, g)
        n_blocks = -(-((start + t_len) // kind.rate) // kind.entries) + 1
        pool_pages = n_blocks + 2
        table = shuffled_block_table([n_blocks], n_blocks + 1, pool_pages, g)[0].contiguous()
        pool, entry_format = new_pool(kind, fmt, pool_pages, g)
        a = torch.randn(t_len, width, generator=g)
        z = torch.randn(t_len, width, generator=g) * 2
        before = pool.clone()
        state_k = state_pool.clone().to(DEVICE)
        compressor_prefill(a.to(DEVICE), z.to(DEVICE), bias.to(DEVICE), norm_w.to(DEVICE), inv, state_k, 1, start, pool, table,
                           rate=kind.rate, entry_format=entry_format, hadamard=had)
        state_r, _, entries = cref.compressor_prefill_ref(
            a, z, bias, norm_w, inv.cpu(), state_pool[1], start, before.cpu(), table.cpu(), kind.rate,
            entry_format=entry_format, hadamard=had.cpu() if had is not None else None)
        what = f"prefill {kind_name}/{fmt} start={start} T={t_len}"
        check_state(state_k[1], state_r, what)
        assert torch.isnan(state_k[0]).all() and torch.isnan(state_k[2]).all(), f"{what}: touched another state block"
        assert [j for j, _ in entries] == list(range(start // kind.rate, (start + t_len) // kind.rate))
        written = [(int(table[j // kind.entries]), j % kind.entries, y) for j, y in entries]
        check_pool(before, pool, fmt, kind.dim, written, what)


@pytest.mark.parametrize("kind_name,fmt,use_had", [c for c in CASES if c[1] != "bf16"], ids=lambda v: str(v))
def test_compressor_prefill_batch_equals_each_run_alone(kind_name, fmt, use_had):
    """Every run of PREFILL_CHUNKS (and an empty-state start) in one launch: each request's entries and state equal
    the reference on its run alone, through its own table and state block in one shared pool."""
    kind, g, width, bias, norm_w, had = _case(kind_name, fmt, use_had, zlib.crc32(f"batch/{kind_name}/{fmt}".encode()))
    inv = rope_inv_freq(ROPE)
    num_acc = 2 if kind.overlap else 1
    runs = [(s * 8, n * 8 + 1) if REAL_SHAPES else (s, n) for s, n in PREFILL_CHUNKS]
    used = [-(-((s + n) // kind.rate) // kind.entries) + 1 for s, n in runs]
    width_blocks = max(used) + 1
    pool_pages = sum(used) + 3
    tables = shuffled_block_table(used, width_blocks, pool_pages, g)
    pool, entry_format = new_pool(kind, fmt, pool_pages, g)
    state_blocks = [2 * r + 1 for r in range(len(runs))]  # every other block: the ones between must stay NaN
    state_pool = torch.full((2 * len(runs) + 1, num_acc, 3, kind.dim), float("nan"))
    for r, (start, _) in enumerate(runs):
        state_pool[state_blocks[r]] = history_state(kind, start, bias, g)
    a = torch.randn(sum(n for _, n in runs), width, generator=g)
    z = torch.randn(a.shape, generator=g) * 2
    before = pool.clone()
    state_k = state_pool.clone().to(DEVICE)
    spans = PrefillSpans.build(runs, state_blocks, DEVICE)
    compressor_prefill_batch(a.to(DEVICE), z.to(DEVICE), bias.to(DEVICE), norm_w.to(DEVICE), inv, state_k, spans, pool,
                             tables, rate=kind.rate, entry_format=entry_format, hadamard=had)
    written, row = [], 0
    for r, (start, t_len) in enumerate(runs):
        state_r, _, entries = cref.compressor_prefill_ref(
            a[row:row + t_len], z[row:row + t_len], bias, norm_w, inv.cpu(), state_pool[state_blocks[r]], start,
            before.cpu(), tables[r].cpu(), kind.rate, entry_format=entry_format, hadamard=had.cpu() if had is not None else None)
        what = f"batch {kind_name}/{fmt} run {r}: start={start} T={t_len}"
        check_state(state_k[state_blocks[r]], state_r, what)
        written += [(int(tables[r][j // kind.entries]), j % kind.entries, y) for j, y in entries]
        row += t_len
    assert torch.isnan(state_k[0::2]).all(), "the batch touched a state block of no request"
    check_pool(before, pool, fmt, kind.dim, written, f"batch {kind_name}/{fmt}")
