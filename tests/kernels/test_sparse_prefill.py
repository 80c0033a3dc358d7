"""Sparse prefill attention against its float32 reference: causal window, paged compressed entries, sink."""

from __future__ import annotations

import zlib

import pytest
import torch

from dsv4.kernels.sparse_prefill import sparse_prefill, sparse_prefill_batch, sparse_prefill_ref
from kernel_checks import (
    DEVICE,
    REAL_SHAPES,
    assert_close,
    make_generator,
    poison_like,
    rope_inv_freq,
    shuffled_block_table,
    spoil_entries,
    spoil_pages,
    to_storage,
)
from test_sparse_decode import FLASH, PRO, SMALL

SHAPES = [FLASH, PRO] if REAL_SHAPES else [SMALL]
# (start_pos, S, S_hist or None for min(start_pos, W - 1)): contexts 1, 63, 127..129, 1000, a chunk from 0,
# and a window cut short by a small S_hist
CHUNKS = [(0, 1, None), (60, 4, None), (125, 5, None), (997, 6, None), (0, 20, None), (100, 12, 3)]
if REAL_SHAPES:
    CHUNKS = [(0, 1, None), (0, 127, None), (129, 128, None), (1000, 129, None), (65536, 512, None), (300, 64, 7)]
FORMATS = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16)]


def make_case(shape, mode, fmt, q_dtype, start, s_len, hist, g):
    h, d, r, w = shape.heads, shape.head_dim, shape.rope_dim, shape.window
    hist = min(start, w - 1) if hist is None else hist
    kv = torch.randn(hist + s_len, d, generator=g).to(q_dtype if fmt != "fp32" else torch.float32).to(DEVICE)
    comp = table = topk = None
    rate = 1
    if mode != "swa":
        rate, e = (shape.csa_rate, shape.csa_entries) if mode == "csa" else (shape.hca_rate, shape.hca_entries)
        n_max = (start + s_len) // rate
        blocks = -(-n_max // e)
        pool_blocks = blocks + 4
        comp = to_storage(torch.randn(pool_blocks, e, d, generator=g), fmt, r)
        table = shuffled_block_table([blocks], blocks + 2, pool_blocks, g)[0].contiguous()
        used = set(table[table < pool_blocks].tolist())
        spoil_pages(comp, torch.tensor(sorted(set(range(pool_blocks)) - used), dtype=torch.long), g)
        tail = list(range(n_max, blocks * e))  # not visible to any query of the chunk
        spoil_entries(comp, table[torch.tensor(tail, dtype=torch.long) // e].long().cpu(), torch.tensor(tail) % e, d, r, g)
        if mode == "csa":
            k = shape.topk
            topk = torch.full((s_len, k), -1, dtype=torch.int32)
            for s in range(s_len):
                n = (start + s + 1) // rate
                pick = torch.randperm(n, generator=g)[: min(k, n) * 3 // 4 + (1 if n else 0)]
                topk[s, torch.randperm(k, generator=g)[: len(pick)]] = pick.to(torch.int32)
            topk = topk.to(DEVICE)
    return dict(
        q=torch.randn(s_len, h, d, generator=g).to(q_dtype).to(DEVICE), start_pos=start, kv=kv, window=w,
        comp=comp, block_table=table, topk_idx=topk, rate=rate,
        sink=(torch.randn(h, generator=g) * 2).to(DEVICE), softmax_scale=d**-0.5, rope_inv_freq=rope_inv_freq(r),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s.heads}_D{s.head_dim}")
@pytest.mark.parametrize("fmt,q_dtype", FORMATS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["swa", "csa", "hca"])
def test_sparse_prefill(shape, fmt, q_dtype, mode):
    g = make_generator(zlib.crc32(f"{mode}/{fmt}/{shape.heads}".encode()))
    for start, s_len, hist in CHUNKS:
        kw = make_case(shape, mode, fmt, q_dtype, start, s_len, hist, g)
        ref = sparse_prefill_ref(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        for max_splits in (1, 2):
            out = poison_like(kw["q"].shape, q_dtype)
            sparse_prefill(**kw, out=out, max_splits=max_splits, min_split_keys=16)
            assert_close(out, ref, q_dtype, f"{mode}/{fmt} start={start} S={s_len} splits={max_splits}")


def make_batch(shape, mode, fmt, q_dtype, g):
    """Every run of CHUNKS as one request of a single pass: one compressed pool, one block table per request."""
    h, d, r, w = shape.heads, shape.head_dim, shape.rope_dim, shape.window
    runs = [(start, s_len, min(start, w - 1) if hist is None else hist) for start, s_len, hist in CHUNKS]
    kv_dtype = q_dtype if fmt != "fp32" else torch.float32
    kvs = [torch.randn(hist + s_len, d, generator=g).to(kv_dtype).to(DEVICE) for _, s_len, hist in runs]
    qs = [torch.randn(s_len, h, d, generator=g).to(q_dtype).to(DEVICE) for _, s_len, _ in runs]
    comp = tables = None
    topks = [None] * len(runs)
    rate = 1
    if mode != "swa":
        rate, e = (shape.csa_rate, shape.csa_entries) if mode == "csa" else (shape.hca_rate, shape.hca_entries)
        blocks = [-(-((start + s_len) // rate) // e) for start, s_len, _ in runs]
        pool_blocks = sum(blocks) + 4
        comp = to_storage(torch.randn(pool_blocks, e, d, generator=g), fmt, r)
        tables = shuffled_block_table(blocks, max(blocks) + 2, pool_blocks, g)
        used = set(tables[tables < pool_blocks].tolist())
        spoil_pages(comp, torch.tensor(sorted(set(range(pool_blocks)) - used), dtype=torch.long), g)
        for i, (start, s_len, _) in enumerate(runs):
            tail = list(range((start + s_len) // rate, blocks[i] * e))  # not visible to any query of the run
            if tail:
                spoil_entries(comp, tables[i][torch.tensor(tail) // e].long().cpu(), torch.tensor(tail) % e, d, r, g)
            if mode == "csa":
                topk = torch.full((s_len, shape.topk), -1, dtype=torch.int32)
                for s in range(s_len):
                    n = (start + s + 1) // rate
                    pick = torch.randperm(n, generator=g)[: min(shape.topk, n) * 3 // 4 + (1 if n else 0)]
                    topk[s, torch.randperm(shape.topk, generator=g)[: len(pick)]] = pick.to(torch.int32)
                topks[i] = topk.to(DEVICE)
    return runs, qs, kvs, comp, tables, topks, rate


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s.heads}_D{s.head_dim}")
@pytest.mark.parametrize("fmt,q_dtype", [FORMATS[0], FORMATS[2]], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["swa", "csa", "hca"])
def test_sparse_prefill_batch_equals_each_request_alone(shape, fmt, q_dtype, mode):
    """All of CHUNKS' runs in one launch (their windows end to end in one tensor, a table each): every
    query equals the reference on its own request."""
    g = make_generator(zlib.crc32(f"batch/{mode}/{fmt}/{shape.heads}".encode()))
    runs, qs, kvs, comp, tables, topks, rate = make_batch(shape, mode, fmt, q_dtype, g)
    h, d, w = shape.heads, shape.head_dim, shape.window
    sink, inv = (torch.randn(h, generator=g) * 2).to(DEVICE), rope_inv_freq(shape.rope_dim)
    positions = torch.cat([torch.arange(start, start + s_len) for start, s_len, _ in runs]).to(DEVICE)
    requests = torch.cat([torch.full((s_len,), i, dtype=torch.int32) for i, (_, s_len, _) in enumerate(runs)]).to(DEVICE)
    bases = torch.tensor([0] + [k.shape[0] for k in kvs[:-1]]).cumsum(0)
    win_lo = torch.tensor([start - hist for start, _, hist in runs])
    num_comp = ((positions + 1) // rate).to(torch.int32) if comp is not None else None
    max_keys = shape.topk if mode == "csa" else (int(num_comp.max()) if comp is not None else 0)
    out = poison_like((positions.shape[0], h, d), q_dtype)
    sparse_prefill_batch(torch.cat(qs), positions, requests, torch.cat(kvs), win_lo.to(DEVICE), bases.to(DEVICE), w, comp,
                         tables, num_comp, torch.cat(topks) if mode == "csa" else None, max_keys, sink, d**-0.5, inv,
                         out=out, max_splits=2, min_split_keys=16)
    row = 0
    for i, (start, s_len, _) in enumerate(runs):
        ref = sparse_prefill_ref(qs[i].cpu(), start, kvs[i].cpu(), w, comp.cpu() if comp is not None else None,
                                 tables[i].cpu() if comp is not None else None,
                                 topks[i].cpu() if topks[i] is not None else None, rate, sink.cpu(), d**-0.5, inv.cpu())
        assert_close(out[row:row + s_len], ref, q_dtype, f"batch {mode}/{fmt} request {i}: start={start} S={s_len}")
        row += s_len


def test_sparse_prefill_batch_of_no_queries_is_empty():
    shape = SHAPES[0]
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out = sparse_prefill_batch(torch.zeros(0, shape.heads, shape.head_dim, device=DEVICE), empty,
                               empty.to(torch.int32), torch.zeros(1, shape.head_dim, device=DEVICE), empty, empty,
                               shape.window, None, None, None, None, 0, torch.zeros(shape.heads, device=DEVICE), 1.0,
                               rope_inv_freq(shape.rope_dim))
    assert out.shape == (0, shape.heads, shape.head_dim)
