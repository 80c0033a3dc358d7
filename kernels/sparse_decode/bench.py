"""GPU benchmark of sparse decode attention at V4 shapes (FP8 paged KV, bf16 queries), CSA and HCA layers."""

from __future__ import annotations

import torch

from ..benchmarking import BenchRow, CheckFailed, ModelShape, bench_device, fits, skipped, time_us
from ..kv_format.bench import dequant_main_pages_torch, gather_main_entries_torch, random_main_pages
from ..kv_format.layout import MainLayout
from .kernel import sparse_decode
from .reference import rotate_interleaved_ref, sparse_decode_flops, sparse_decode_ref


def rope_inv_freq(rope_dim: int, device, theta: float = 160000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64, device=device) / rope_dim)).float()


def make_decode_inputs(model: ModelShape, batch: int, context: int, mode: str, gen: torch.Generator) -> dict:
    """Decode inputs on the GPU: every request at position context - 1, FP8 pages, shuffled block tables."""
    dev = bench_device()
    h, d, r, w = model.heads, model.head_dim, model.rope_dim, model.window
    positions = torch.full((batch,), context - 1, dtype=torch.int64, device=dev)
    ring = random_main_pages(batch, w, d, r, dev, gen)
    ring_block = torch.randperm(batch, device=dev, generator=gen).to(torch.int32)
    rate, e = (model.csa_rate, model.csa_entries) if mode == "csa" else (model.hca_rate, model.hca_entries)
    n = context // rate
    blocks = -(-n // e)
    comp = random_main_pages(batch * blocks, e, d, r, dev, gen)
    table = torch.randperm(batch * blocks, device=dev, generator=gen).to(torch.int32).view(batch, blocks)
    topk = None
    if mode == "csa":
        k = min(model.topk, n)
        topk = torch.rand(batch, n, device=dev, generator=gen).topk(k, dim=1).indices.to(torch.int32).contiguous()
    return dict(
        q=torch.randn(batch, h, d, device=dev, generator=gen).to(torch.bfloat16), positions=positions, ring=ring,
        ring_block=ring_block, comp=comp, block_table=table, num_comp=torch.full((batch,), n, dtype=torch.int32, device=dev),
        topk_idx=topk, sink=torch.randn(h, device=dev, generator=gen), softmax_scale=d**-0.5, rope_inv_freq=rope_inv_freq(r, dev),
    )


def torch_sparse_decode(q, positions, ring, ring_block, comp, block_table, num_comp, topk_idx, sink, softmax_scale, rope_inv_freq):
    """Plain PyTorch: gather + dequantize the keys, bf16 einsum, softmax with the sink column, einsum, inverse RoPE."""
    b, h, d = q.shape
    r = 2 * rope_inv_freq.shape[0]
    lay = MainLayout(d, r)
    w = ring.shape[1] // lay.entry_bytes
    dev = q.device
    pos = positions[:, None] - w + 1 + torch.arange(w, device=dev)  # [B, W]
    ring_f = dequant_main_pages_torch(ring[ring_block.long()], d, r)  # [B, W, D]
    win = ring_f.gather(1, (pos % w)[..., None].expand(-1, -1, d))
    valid = [pos >= 0]
    keys = [win]
    e = comp.shape[1] // lay.entry_bytes
    if topk_idx is not None:
        idx = topk_idx.long()
        ok = (idx >= 0) & (idx < num_comp[:, None])
        idx = idx.clamp(min=0)
        page = block_table.long().gather(1, idx // e)  # [B, K]
        keys.append(gather_main_entries_torch(comp, page.flatten(), (idx % e).flatten(), d, r).view(b, -1, d))
    else:
        ent = dequant_main_pages_torch(comp[block_table.long()], d, r).flatten(1, 2)  # [B, blocks * E, D]
        ok = torch.arange(ent.shape[1], device=dev)[None, :] < num_comp[:, None]
        keys.append(ent)
    valid.append(ok)
    keys = torch.cat(keys, 1).to(torch.bfloat16)  # [B, n, D]
    logits = torch.einsum("bhd,bnd->bhn", q, keys).float() * softmax_scale
    logits = logits.masked_fill(~torch.cat(valid, 1)[:, None, :], float("-inf"))
    full = torch.cat([logits, sink[None, :, None].expand(b, -1, 1)], dim=2)
    p = torch.softmax(full, dim=2)[..., :-1].to(torch.bfloat16)
    o = torch.einsum("bhn,bnd->bhd", p, keys).float()
    ang = -(positions.float()[:, None] * rope_inv_freq[None, :])  # [B, R/2]
    return rotate_interleaved_ref(o, ang[:, None, :]).to(q.dtype)


def _compact(kw: dict, n_req: int) -> dict:
    """The first n_req requests with only their own pages, so the float32 reference stays small."""
    sub = {k: v for k, v in kw.items()}
    for k in ("q", "positions", "ring_block", "num_comp", "topk_idx"):
        if sub.get(k) is not None:
            sub[k] = sub[k][:n_req].contiguous()
    table = kw["block_table"][:n_req]
    sub["comp"] = kw["comp"][table.flatten().long()].contiguous()
    sub["block_table"] = torch.arange(table.numel(), dtype=torch.int32, device=table.device).view(table.shape)
    return sub


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 2e-2, rtol: float = 2e-2) -> None:
    err = (out.float() - ref.float()).abs()
    if not torch.isfinite(out.float()).all() or (err > atol + rtol * ref.float().abs()).any():
        raise CheckFailed(f"{what}: max abs err {err.max().item():.3g}")


def bench(model: ModelShape, batch: int, context: int) -> list[BenchRow]:
    dev = bench_device()
    lay = MainLayout(model.head_dim, model.rope_dim)
    rows = []
    for mode in ("csa", "hca"):
        op = f"sparse_decode.{mode}"
        cfg = f"{model.name} B={batch} ctx={context}"
        rate = model.csa_rate if mode == "csa" else model.hca_rate
        n = context // rate
        n_sel = min(model.topk, n) if mode == "csa" else n
        e = model.csa_entries if mode == "csa" else model.hca_entries
        pool_bytes = batch * (-(-n // e)) * e * lay.entry_bytes
        base_bytes = batch * (model.window + n_sel) * model.head_dim * 4 * 3  # the torch baseline's gathered copies
        if not fits(dev, pool_bytes + base_bytes):
            rows.append(skipped(op, cfg, "does not fit in GPU memory"))
            continue
        gen = torch.Generator(device=dev)
        gen.manual_seed(batch * 7 + context)
        kw = make_decode_inputs(model, batch, context, mode, gen)
        out = sparse_decode(**kw)
        sub = _compact(kw, min(batch, 2))
        check_close(out[: min(batch, 2)], sparse_decode_ref(**sub), f"{op} vs float32 reference")
        base = torch_sparse_decode(**kw)
        check_close(out, base, f"{op} vs torch baseline", atol=5e-2, rtol=5e-2)  # the baseline rounds logits to bf16
        us = time_us(lambda: sparse_decode(**kw, out=out), graph=True)
        ref_us = time_us(lambda: torch_sparse_decode(**kw), graph=True)
        keys = min(context, model.window) + n_sel
        nbytes = batch * (keys * lay.entry_bytes + 2 * model.heads * model.head_dim * 2 + (4 * n_sel if mode == "csa" else 0))
        rows.append(BenchRow(op, cfg, us, bytes=nbytes, flops=batch * sparse_decode_flops(model.heads, model.head_dim, keys),
                             ref_us=ref_us))
        del kw, out, sub, base
    return rows


SWEEP_CONFIGS = [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2), (64, 32, 8, 3), (64, 32, 8, 1),
                 (64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2), (32, 32, 8, 2)]
# split-K plans (keys per split at least, most splits) beside the default (DECODE_SPLIT_KEYS, DECODE_MAX_SPLITS),
# timed with the default launch: more splits fill the GPU at batch 1, fewer write less workspace at batch 128
SWEEP_SPLITS = [(64, 16), (256, 4), (32, 32), (640, 1)]


def sweep(model: ModelShape, batch: int, context: int, mode: str, configs=SWEEP_CONFIGS) -> list[BenchRow]:
    """Time (BLOCK_H, BLOCK_N, num_warps, num_stages) variants on one shape; each is checked before it is timed."""
    dev = bench_device()
    gen = torch.Generator(device=dev)
    gen.manual_seed(batch * 7 + context)
    kw = make_decode_inputs(model, batch, context, mode, gen)
    m = min(batch, 2)
    ref = sparse_decode_ref(**_compact(kw, m))
    rate = model.csa_rate if mode == "csa" else model.hca_rate
    keys = min(context, model.window) + (min(model.topk, context // rate) if mode == "csa" else context // rate)
    flops = batch * sparse_decode_flops(model.heads, model.head_dim, keys)
    variants = [(f"H/N/w/s={'/'.join(map(str, cfg))}", {"launch": cfg}) for cfg in configs]
    variants += [(f"split keys/max={keys_per}/{most}", {"min_split_keys": keys_per, "max_splits": most})
                 for keys_per, most in SWEEP_SPLITS]
    rows = []
    for name, options in variants:
        label = f"{model.name} B={batch} ctx={context} {mode} {name}"
        try:
            out = sparse_decode(**kw, **options)
            check_close(out[:m], ref, "sweep")
            us = time_us(lambda: sparse_decode(**kw, out=out, **options), graph=True)
            rows.append(BenchRow("sparse_decode.sweep", label, us, flops=flops))
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or to check is reported, not timed
            rows.append(BenchRow("sparse_decode.sweep", label, None, note=f"{type(e).__name__}: {str(e)[:80]}"))
    return rows
