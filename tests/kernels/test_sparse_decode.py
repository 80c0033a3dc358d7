"""Sparse decode attention against its float32 reference: paged, shuffled, poisoned, all storage formats."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from dsv4.kernels.sparse_decode import sparse_decode, sparse_decode_ref
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


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int
    head_dim: int
    rope_dim: int
    window: int
    csa_rate: int
    csa_entries: int  # entries per compressed block (256 / rate in the server; smaller here)
    topk: int
    hca_rate: int
    hca_entries: int


SMALL = Shape(heads=4, head_dim=128, rope_dim=64, window=16, csa_rate=4, csa_entries=8, topk=24, hca_rate=16, hca_entries=4)
FLASH = Shape(heads=64, head_dim=512, rope_dim=64, window=128, csa_rate=4, csa_entries=64, topk=512, hca_rate=128, hca_entries=2)
PRO = Shape(heads=128, head_dim=512, rope_dim=64, window=128, csa_rate=4, csa_entries=64, topk=1024, hca_rate=128, hca_entries=2)
SHAPES = [FLASH, PRO] if REAL_SHAPES else [SMALL]
# context lengths t + 1 of the requests of one batch: 1 has no compressed entry at all
LENGTHS = [1, 63, 127, 128, 129, 1000] + ([8192, 70000] if REAL_SHAPES else [])
FORMATS = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16), ("fp8", torch.float32)]
if REAL_SHAPES:  # the GPU serves bf16 queries over bf16 or FP8 caches; float32 is covered at small shapes
    FORMATS = [("bf16", torch.bfloat16), ("fp8", torch.bfloat16)]


def make_case(shape: Shape, mode: str, fmt: str, q_dtype: torch.dtype, lengths: list[int], seed: int):
    """Random inputs of one decode batch; returns the kwargs of `sparse_decode`."""
    g = make_generator(seed)
    h, d, r, w = shape.heads, shape.head_dim, shape.rope_dim, shape.window
    b = len(lengths)
    positions = torch.tensor([n - 1 for n in lengths], dtype=torch.int64)
    # ring: one block per request out of a shuffled, larger pool; slots not yet written are poisoned
    ring_pool = b + 3
    ring_vals = torch.randn(ring_pool, w, d, generator=g)
    ring = to_storage(ring_vals, fmt, r)
    ring_block = torch.randperm(ring_pool, generator=g)[:b].to(torch.int32)
    unused = sorted(set(range(ring_pool)) - set(ring_block.tolist()))
    spoil_pages(ring, torch.tensor(unused, dtype=torch.long), g)
    dead_p, dead_s = [], []
    for i, t in enumerate(positions.tolist()):
        for slot in range(t + 1, w):  # never written yet
            dead_p.append(int(ring_block[i]))
            dead_s.append(slot)
    spoil_entries(ring, torch.tensor(dead_p, dtype=torch.long), torch.tensor(dead_s, dtype=torch.long), d, r, g)

    comp = block_table = num_comp = topk = None
    if mode != "swa":
        rate, e = (shape.csa_rate, shape.csa_entries) if mode == "csa" else (shape.hca_rate, shape.hca_entries)
        num_comp = torch.tensor([n // rate for n in lengths], dtype=torch.int32)
        blocks = [-(-int(n) // e) for n in num_comp]
        max_blocks = max(blocks) + 2
        pool_blocks = sum(blocks) + 5
        comp_vals = torch.randn(pool_blocks, e, d, generator=g)
        comp = to_storage(comp_vals, fmt, r)
        block_table = shuffled_block_table(blocks, max_blocks, pool_blocks, g)
        used = set(block_table[block_table < pool_blocks].tolist())
        spoil_pages(comp, torch.tensor(sorted(set(range(pool_blocks)) - used), dtype=torch.long), g)
        # rows past num_comp in a request's last block are not visible yet
        dp, ds = [], []
        for i, n in enumerate(num_comp.tolist()):
            for j in range(n, blocks[i] * e):
                dp.append(int(block_table[i, j // e]))
                ds.append(j % e)
        spoil_entries(comp, torch.tensor(dp, dtype=torch.long), torch.tensor(ds, dtype=torch.long), d, r, g)
        if mode == "csa":
            k = shape.topk
            topk = torch.full((b, k), -1, dtype=torch.int32)
            for i, n in enumerate(num_comp.tolist()):
                pick = torch.randperm(n, generator=g)[: min(k, n)]
                if n > 2 * k // 3:  # leave a few -1 holes inside the list too
                    pick = pick[: 2 * k // 3]
                slots = torch.randperm(k, generator=g)[: len(pick) + 1]
                topk[i, slots[: len(pick)]] = pick.to(torch.int32)
                if len(slots) > len(pick):  # an index past num_comp is skipped like -1
                    topk[i, slots[-1]] = n
        num_comp = num_comp.to(DEVICE)
        topk = topk.to(DEVICE) if topk is not None else None
    return dict(
        q=torch.randn(b, h, d, generator=g).to(q_dtype).to(DEVICE),
        positions=positions.to(DEVICE),
        ring=ring,
        ring_block=ring_block.to(DEVICE),
        comp=comp,
        block_table=block_table,
        num_comp=num_comp,
        topk_idx=topk,
        sink=(torch.randn(h, generator=g) * 2).to(DEVICE),
        softmax_scale=d**-0.5,
        rope_inv_freq=rope_inv_freq(r),
    )


def _ref(kw):
    host = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return sparse_decode_ref(**host)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s.heads}_D{s.head_dim}")
@pytest.mark.parametrize("fmt,q_dtype", FORMATS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["swa", "csa", "hca"])
def test_sparse_decode(shape, fmt, q_dtype, mode):
    seed = zlib.crc32(f"{mode}/{fmt}/{q_dtype}/{shape.heads}".encode())
    kw = make_case(shape, mode, fmt, q_dtype, LENGTHS, seed)
    ref = _ref(kw)
    for max_splits, split_keys in ((None, None), (1, 16), (3, 16), (8, 32)):
        plan = {} if max_splits is None else dict(max_splits=max_splits, min_split_keys=split_keys)
        out = poison_like(kw["q"].shape, q_dtype)
        sparse_decode(**kw, out=out, **plan)
        assert_close(out, ref, q_dtype, f"{mode}/{fmt}/splits={max_splits}x{split_keys}")


def _rows(kw: dict, rows: list[int]) -> dict:
    """The same requests as a smaller batch (rows picked and reordered); pools shared."""
    idx = torch.tensor(rows, device=DEVICE)
    per_row = ("q", "positions", "ring_block", "block_table", "num_comp", "topk_idx")
    return {k: (v[idx] if k in per_row and v is not None else v) for k, v in kw.items()}


@pytest.mark.parametrize("mode", ["csa", "hca"])
def test_sparse_decode_is_batch_invariant(mode):
    """A request's output is the same bits alone, in a batch, at any row (split boundaries are its own)."""
    shape = SMALL if not REAL_SHAPES else FLASH
    kw = make_case(shape, mode, "fp8", torch.bfloat16, LENGTHS, seed=17)
    plan = dict(max_splits=4, min_split_keys=16)
    full = sparse_decode(**kw, **plan)
    n = kw["q"].shape[0]
    for b in range(n):
        alone = sparse_decode(**_rows(kw, [b]), **plan)
        assert torch.equal(alone[0], full[b]), f"row {b} alone differs from row {b} in the batch"
    order = list(reversed(range(n)))
    assert torch.equal(sparse_decode(**_rows(kw, order), **plan), full[torch.tensor(order, device=DEVICE)])


def test_sink_only_enlarges_the_denominator():
    """Sink -> -inf gives the plain softmax; a huge sink drives every output towards 0."""
    kw = make_case(SMALL if not REAL_SHAPES else FLASH, "hca", "fp32", torch.float32, [40, 129], seed=5)
    kw["sink"] = torch.full_like(kw["sink"], -1e30)
    plain = sparse_decode(**kw)
    assert_close(plain, _ref(kw), torch.float32, "sink=-inf")
    kw["sink"] = torch.full_like(kw["sink"], 80.0)
    assert sparse_decode(**kw).abs().max() < 1e-20
