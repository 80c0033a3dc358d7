"""Lightning-Indexer top-k against the float32 reference: scores, exact top-k sets (ties allowed), -1 padding."""

from __future__ import annotations

import zlib

import pytest
import torch

from dsv4.kernels.indexer_topk import (
    indexer_topk_decode,
    indexer_topk_decode_ref,
    indexer_topk_prefill,
    indexer_topk_prefill_batch,
    indexer_topk_prefill_ref,
)
from dsv4.kernels.kv_format import reference as kv_ref
from kernel_checks import DEVICE, REAL_SHAPES, make_generator, poison_like, shuffled_block_table

HEADS, DIM = (64, 128) if REAL_SHAPES else (4, 128)
ENTRIES = 64 if REAL_SHAPES else 16
TOPKS = [512, 1024] if REAL_SHAPES else [16, 128]
LENGTHS = [0, 1, 63, 127, 128, 129, 1000] + ([8191, 65536, 262144] if REAL_SHAPES else [])
FORMATS = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16), ("fp4", torch.bfloat16)]


def key_pool(values: torch.Tensor, fmt: str) -> tuple[torch.Tensor, str | None]:
    """Float keys `[P, E, C]` -> storage tensor and key_format."""
    if fmt == "fp32":
        return values.float().to(DEVICE), None
    if fmt == "bf16":
        return values.to(torch.bfloat16).to(DEVICE), None
    p, e, c = values.shape
    packed = kv_ref.quantize_index_ref(values.reshape(p * e, c), fmt)
    pages = torch.empty(p, e * packed.shape[1], dtype=torch.uint8)
    kv_ref.scatter_entries_ref(pages, torch.arange(p).repeat_interleave(e), torch.arange(e).repeat(p), packed,
                               kv_ref.index_planes(c, fmt))
    return pages.to(DEVICE), fmt


def spoil_key_pages(pool: torch.Tensor, ids: list[int], g: torch.Generator) -> None:
    if not ids:
        return
    t = torch.tensor(ids, dtype=torch.long, device=pool.device)
    if pool.dtype == torch.uint8:
        pool[t] = (torch.randint(0, 256, (len(ids), pool.shape[1]), dtype=torch.uint8, generator=g) | 0x7F).to(pool.device)
    else:
        pool[t] = float("nan")


def check_topk_row(idx: torch.Tensor, scores: torch.Tensor, k: int, what: str) -> None:
    """idx `[K]` int32 from the kernel; scores `[n]` float32 reference. Exact top-k up to ties within tolerance."""
    n = scores.numel()
    kept = min(k, n)
    valid = idx[idx != -1]
    assert valid.numel() == kept, f"{what}: {valid.numel()} indices, expected {kept}"
    assert int((idx == -1).sum()) == k - kept
    assert valid.unique().numel() == kept, f"{what}: duplicate indices"
    assert ((valid >= 0) & (valid < n)).all(), f"{what}: index out of range"
    if kept == n:
        return
    tol = 1e-4 * float(scores.abs().max()) + 1e-30
    kth = torch.topk(scores, kept).values[-1]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[valid.long()] = True
    assert (scores[chosen] >= kth - tol).all(), f"{what}: picked a score below the k-th"
    assert (scores[~chosen] <= kth + tol).all(), f"{what}: left out a score above the k-th"


def make_decode_case(fmt: str, q_dtype: torch.dtype, lengths: list[int], seed: int, values_fn=None):
    g = make_generator(seed)
    b = len(lengths)
    blocks = [-(-n // ENTRIES) for n in lengths]
    pool_blocks = sum(blocks) + 4
    values = torch.randn(pool_blocks, ENTRIES, DIM, generator=g) if values_fn is None else values_fn(pool_blocks)
    pool, key_format = key_pool(values, fmt)
    table = shuffled_block_table(blocks, max(blocks) + 2, pool_blocks, g)
    used = set(table[table < pool_blocks].tolist())
    spoil_key_pages(pool, sorted(set(range(pool_blocks)) - used), g)
    q = torch.randn(b, HEADS, DIM, generator=g).to(q_dtype).to(DEVICE)
    w = (torch.randn(b, HEADS, generator=g) * (HEADS * DIM) ** -0.5).to(DEVICE)
    return dict(q=q, w=w, keys=pool, block_table=table, num_visible=torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                key_format=key_format)


def _host(kw):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("topk", TOPKS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("fmt,q_dtype", FORMATS, ids=lambda v: str(v).replace("torch.", ""))
def test_indexer_topk_decode(fmt, q_dtype, topk):
    kw = make_decode_case(fmt, q_dtype, LENGTHS, zlib.crc32(f"{fmt}/{topk}".encode()))
    out = poison_like((len(LENGTHS), topk), torch.int32)
    idx, scores = indexer_topk_decode(**kw, topk=topk, out=out, return_scores=True)
    ref_idx, ref_scores = indexer_topk_decode_ref(**_host(kw), topk=topk)
    for b, n in enumerate(LENGTHS):
        s_ref = ref_scores[b]
        s_k = scores[b, :n].cpu()
        assert torch.allclose(s_k, s_ref, rtol=1e-4, atol=1e-4 * float(s_ref.abs().max() if n else 1.0)), f"scores n={n}"
        check_topk_row(idx[b].cpu(), s_ref, topk, f"{fmt} n={n}")


def test_indexer_topk_ties_and_signs():
    """Many exactly equal scores at the k-th place (zero keys) and negative head weights."""
    n, k = (3000, 600) if REAL_SHAPES else (300, 50)
    g = make_generator(11)

    def values_fn(pool_blocks: int) -> torch.Tensor:
        values = torch.zeros(pool_blocks * ENTRIES, DIM)
        strong = torch.rand(pool_blocks * ENTRIES, generator=g) < 0.1  # ~k/5 strong keys per request, zeros tie
        values[strong] = torch.randn(int(strong.sum()), DIM, generator=g)
        return values.view(pool_blocks, ENTRIES, DIM)

    for fmt in ("fp32", "fp8"):
        kw = make_decode_case(fmt, torch.float32 if fmt == "fp32" else torch.bfloat16, [n, n], 12, values_fn=values_fn)
        kw["w"][1] = -kw["w"][1].abs()  # second query: all scores <= 0
        idx, _ = indexer_topk_decode(**kw, topk=k, return_scores=True)
        _, ref_scores = indexer_topk_decode_ref(**_host(kw), topk=k)
        for b in range(2):
            check_topk_row(idx[b].cpu(), ref_scores[b], k, f"ties {fmt} row {b}")


@pytest.mark.parametrize("fmt,q_dtype", [("fp32", torch.float32), ("fp4", torch.bfloat16)], ids=lambda v: str(v).replace("torch.", ""))
def test_indexer_topk_prefill(fmt, q_dtype):
    g = make_generator(21)
    start, s_len, k = (30000, 64, 512) if REAL_SHAPES else (120, 24, 16)
    rate = 4
    n_max = (start + s_len) // rate
    blocks = -(-n_max // ENTRIES)
    pool_blocks = blocks + 3
    pool, key_format = key_pool(torch.randn(pool_blocks, ENTRIES, DIM, generator=g), fmt)
    table = shuffled_block_table([blocks], blocks + 1, pool_blocks, g)[0].contiguous()
    used = set(table[table < pool_blocks].tolist())
    spoil_key_pages(pool, sorted(set(range(pool_blocks)) - used), g)
    q = torch.randn(s_len, HEADS, DIM, generator=g).to(q_dtype).to(DEVICE)
    w = (torch.randn(s_len, HEADS, generator=g) * 0.1).to(DEVICE)
    out = poison_like((s_len, k), torch.int32)
    indexer_topk_prefill(q, w, pool, table, start, k, rate=rate, key_format=key_format, out=out, query_chunk=s_len // 3 + 1)
    _, ref_scores = indexer_topk_prefill_ref(q.cpu(), w.cpu(), pool.cpu(), table.cpu(), start, k, rate, key_format)
    for s in range(s_len):
        check_topk_row(out[s].cpu(), ref_scores[s], k, f"prefill query {s}")


@pytest.mark.parametrize("fmt,q_dtype", [("fp32", torch.float32), ("fp8", torch.bfloat16)], ids=lambda v: str(v).replace("torch.", ""))
def test_indexer_topk_prefill_batch_equals_each_request_alone(fmt, q_dtype):
    """Three prompts' queries in one call (launches split across the prompts' boundaries): each query's picks
    are the exact top-k of its own request's keys, read through its own table."""
    g = make_generator(zlib.crc32(f"prefill-batch/{fmt}".encode()))
    # (start, S): the first and last see more than k entries, the middle one fewer
    runs = [(3000, 40), (0, 9), (30000, 24)] if REAL_SHAPES else [(90, 10), (0, 9), (120, 20)]
    k, rate = (512, 4) if REAL_SHAPES else (16, 4)
    blocks = [-(-((start + s_len) // rate) // ENTRIES) for start, s_len in runs]
    pool_blocks = sum(blocks) + 3
    pool, key_format = key_pool(torch.randn(pool_blocks, ENTRIES, DIM, generator=g), fmt)
    tables = shuffled_block_table(blocks, max(blocks) + 1, pool_blocks, g)
    used = set(tables[tables < pool_blocks].tolist())
    spoil_key_pages(pool, sorted(set(range(pool_blocks)) - used), g)
    n_q = sum(s_len for _, s_len in runs)
    q = torch.randn(n_q, HEADS, DIM, generator=g).to(q_dtype).to(DEVICE)
    w = (torch.randn(n_q, HEADS, generator=g) * 0.1).to(DEVICE)
    positions = torch.cat([torch.arange(start, start + s_len) for start, s_len in runs])
    requests = torch.cat([torch.full((s_len,), r, dtype=torch.int32) for r, (_, s_len) in enumerate(runs)]).to(DEVICE)
    visible = ((positions + 1) // rate).to(torch.int32)
    out = poison_like((n_q, k), torch.int32)
    indexer_topk_prefill_batch(q, w, pool, tables, requests, visible.to(DEVICE), int(visible.max()), k,
                               key_format=key_format, out=out, query_chunk=7)
    row = 0
    for r, (start, s_len) in enumerate(runs):
        _, ref_scores = indexer_topk_prefill_ref(q[row:row + s_len].cpu(), w[row:row + s_len].cpu(), pool.cpu(),
                                                 tables[r].cpu(), start, k, rate, key_format)
        for s in range(s_len):
            check_topk_row(out[row + s].cpu(), ref_scores[s], k, f"request {r} query {s}")
        row += s_len


def test_indexer_topk_is_ordered_batch_invariant_and_breaks_ties_low():
    """Picks come in increasing index order, ties at the k-th score go to the lowest indices, and a
    query's picks are the same alone, in a batch or in another row (no atomics decide anything)."""
    n, k = (5000, 512) if REAL_SHAPES else (400, 40)
    g = make_generator(31)

    def values_fn(pool_blocks: int) -> torch.Tensor:
        values = torch.zeros(pool_blocks * ENTRIES, DIM)
        strong = torch.rand(pool_blocks * ENTRIES, generator=g) < 0.05  # the rest score exactly 0: ties
        values[strong] = torch.randn(int(strong.sum()), DIM, generator=g)
        return values.view(pool_blocks, ENTRIES, DIM)

    kw = make_decode_case("fp8", torch.bfloat16, [n, n // 2 + 3, n], 32, values_fn=values_fn)
    kw["w"] = kw["w"].abs()
    full, scores = indexer_topk_decode(**kw, topk=k, return_scores=True)
    _, ref_scores = indexer_topk_decode_ref(**_host(kw), topk=k)
    for b in range(3):
        row = full[b].cpu()
        valid = row[row >= 0]
        assert torch.equal(valid, valid.sort().values), f"row {b}: picks not in increasing order"
        check_topk_row(row, ref_scores[b], k, f"row {b}")
        s = scores[b, : int(kw["num_visible"][b])].cpu()
        kth = s[valid.long()].min()
        tied = (s == kth).nonzero().flatten()
        taken = set(valid.tolist())
        needed = sum(1 for i in tied.tolist() if i in taken)
        assert set(tied[:needed].tolist()) <= taken, f"row {b}: ties not broken towards low indices"
        single = {key: (v[b : b + 1] if key in ("q", "w", "block_table", "num_visible") else v) for key, v in kw.items()}
        assert torch.equal(indexer_topk_decode(**single, topk=k)[0], full[b]), f"row {b} differs alone"
