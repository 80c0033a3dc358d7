"""GPU benchmark of the Lightning-Indexer top-k at V4 shapes (n_I 64, c_I 128, FP8/FP4 paged keys)."""

from __future__ import annotations

import torch

from ..benchmarking import BenchRow, CheckFailed, ModelShape, bench_device, fits, skipped, time_us
from ..kv_format.bench import dequant_index_pages_torch, random_index_pages
from ..kv_format.layout import IndexLayout
from .kernel import indexer_topk_decode
from .reference import indexer_topk_decode_ref


def torch_indexer_topk(q, w, keys, block_table, num_visible, topk, key_format):
    """Plain PyTorch: dequantize every candidate page, bf16 einsum, relu, weighted sum, torch.topk."""
    b, _, c = q.shape
    k = dequant_index_pages_torch(keys[block_table.long()], c, key_format).flatten(1, 2).to(torch.bfloat16)  # [B, N, C]
    scores = (torch.relu(torch.einsum("bhc,bnc->bnh", q, k).float()) * w[:, None, :]).sum(-1)  # [B, N]
    scores = scores.masked_fill(torch.arange(scores.shape[1], device=q.device)[None] >= num_visible[:, None], float("-inf"))
    return scores.topk(min(topk, scores.shape[1]), dim=1).indices


def check_topk(idx: torch.Tensor, scores: torch.Tensor, k: int, what: str) -> None:
    """Same criterion as the tests: exact top-k up to near-ties at the k-th score."""
    n = scores.numel()
    kept = min(k, n)
    valid = idx[idx != -1].long()
    if valid.numel() != kept or valid.unique().numel() != kept:
        raise CheckFailed(f"{what}: {valid.numel()} indices, expected {kept} distinct")
    if kept == n:
        return
    tol = 1e-3 * float(scores.abs().max())
    kth = torch.topk(scores, kept).values[-1]
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    chosen[valid] = True
    if (scores[chosen] < kth - tol).any() or (scores[~chosen] > kth + tol).any():
        raise CheckFailed(f"{what}: not the top-{k}")


def bench(model: ModelShape, batch: int, context: int) -> list[BenchRow]:
    dev = bench_device()
    rows = []
    n = context // model.csa_rate
    e = model.csa_entries
    blocks = -(-n // e)
    c, nh, k = model.index_dim, model.index_heads, model.topk
    for fmt in ("fp8", "fp4"):
        op = f"indexer_topk.{fmt}"
        cfg = f"{model.name} B={batch} ctx={context} K={k}"
        lay = IndexLayout(c, fmt)
        need = batch * blocks * e * (lay.entry_bytes + 4 * 4 + c * 2 * 2 + nh * 4)
        if not fits(dev, need):
            rows.append(skipped(op, cfg, "does not fit in GPU memory"))
            continue
        gen = torch.Generator(device=dev)
        gen.manual_seed(batch + context)
        keys = random_index_pages(batch * blocks, e, c, fmt, dev, gen)
        table = torch.randperm(batch * blocks, device=dev, generator=gen).to(torch.int32).view(batch, blocks)
        q = torch.randn(batch, nh, c, device=dev, generator=gen).to(torch.bfloat16)
        w = torch.randn(batch, nh, device=dev, generator=gen) * (nh * c) ** -0.5
        vis = torch.full((batch,), n, dtype=torch.int32, device=dev)
        out = indexer_topk_decode(q, w, keys, table, vis, k, key_format=fmt)
        m = min(batch, 2)
        sub_keys = keys[table[:m].flatten().long()].contiguous()
        sub_table = torch.arange(m * blocks, dtype=torch.int32, device=dev).view(m, blocks)
        _, ref_scores = indexer_topk_decode_ref(q[:m], w[:m], sub_keys, sub_table, vis[:m], k, fmt)
        for i in range(m):
            check_topk(out[i], ref_scores[i], k, f"{op} request {i}")
        us = time_us(lambda: indexer_topk_decode(q, w, keys, table, vis, k, key_format=fmt, out=out), graph=True)
        ref_us = None
        note = ""
        if fits(dev, batch * blocks * e * (c * 2 + nh * 4 * 2 + 4) * 2):
            ref_us = time_us(lambda: torch_indexer_topk(q, w, keys, table, vis, k, fmt), graph=True)
        else:
            note = "torch baseline does not fit"
        nbytes = batch * (n * lay.entry_bytes + nh * c * 2 + nh * 4 + k * 4)
        rows.append(BenchRow(op, cfg, us, bytes=nbytes, flops=2 * batch * n * nh * c, ref_us=ref_us, note=note))
        del keys, out
    return rows


SWEEP_CONFIGS = [(128, 4), (128, 8), (64, 4), (256, 8), (64, 2)]


def sweep(model: ModelShape, batch: int, context: int, fmt: str = "fp8", configs=SWEEP_CONFIGS) -> list[BenchRow]:
    """Time (BLOCK_N, num_warps) of the scoring kernel on one shape; each variant is checked first."""
    dev = bench_device()
    n = context // model.csa_rate
    e = model.csa_entries
    blocks = -(-n // e)
    c, nh, k = model.index_dim, model.index_heads, model.topk
    gen = torch.Generator(device=dev)
    gen.manual_seed(batch + context)
    keys = random_index_pages(batch * blocks, e, c, fmt, dev, gen)
    table = torch.randperm(batch * blocks, device=dev, generator=gen).to(torch.int32).view(batch, blocks)
    q = torch.randn(batch, nh, c, device=dev, generator=gen).to(torch.bfloat16)
    w = torch.randn(batch, nh, device=dev, generator=gen) * (nh * c) ** -0.5
    vis = torch.full((batch,), n, dtype=torch.int32, device=dev)
    m = min(batch, 2)
    sub_keys = keys[table[:m].flatten().long()].contiguous()
    sub_table = torch.arange(m * blocks, dtype=torch.int32, device=dev).view(m, blocks)
    _, ref_scores = indexer_topk_decode_ref(q[:m], w[:m], sub_keys, sub_table, vis[:m], k, fmt)
    rows = []
    for cfg in configs:
        label = f"{model.name} B={batch} ctx={context} {fmt} N/w={cfg[0]}/{cfg[1]}"
        try:
            out = indexer_topk_decode(q, w, keys, table, vis, k, key_format=fmt, launch=cfg)
            for i in range(m):
                check_topk(out[i], ref_scores[i], k, "sweep")
            us = time_us(lambda: indexer_topk_decode(q, w, keys, table, vis, k, key_format=fmt, out=out, launch=cfg), graph=True)
            rows.append(BenchRow("indexer_topk.sweep", label, us, bytes=batch * n * IndexLayout(c, fmt).entry_bytes,
                                 flops=2 * batch * n * nh * c))
        except Exception as e:  # noqa: BLE001
            rows.append(BenchRow("indexer_topk.sweep", label, None, note=f"{type(e).__name__}: {str(e)[:80]}"))
    return rows
