"""GPU benchmark of sparse prefill attention: one request, S queries ending at the context length."""

from __future__ import annotations

import torch

from ..benchmarking import BenchRow, ModelShape, bench_device, fits, skipped, time_us
from ..kv_format.bench import dequant_main_pages_torch, random_main_pages
from ..kv_format.layout import MainLayout
from ..sparse_decode.bench import check_close, rope_inv_freq
from ..sparse_decode.reference import rotate_interleaved_ref, sparse_decode_flops
from .kernel import sparse_prefill
from .reference import sparse_prefill_ref


def torch_sparse_prefill(q, start_pos, kv, window, comp, block_table, topk_idx, rate, sink, softmax_scale, rope_inv_freq,
                         chunk: int = 128):
    """Plain PyTorch over query chunks: gather window rows + compressed entries, bf16 einsums, sink, inverse RoPE."""
    s_len, h, d = q.shape
    r = 2 * rope_inv_freq.shape[0]
    dev = q.device
    hist = kv.shape[0] - s_len
    comp_f = dequant_main_pages_torch(comp[block_table.long()], d, r).flatten(0, 1).to(torch.bfloat16)  # [n_max, D]
    out = torch.empty_like(q)
    for c0 in range(0, s_len, chunk):
        c1 = min(s_len, c0 + chunk)
        t = start_pos + torch.arange(c0, c1, device=dev)  # [C]
        pos = t[:, None] - window + 1 + torch.arange(window, device=dev)  # [C, W]
        wvalid = pos >= max(0, start_pos - hist)
        win = kv[(pos - (start_pos - hist)).clamp(min=0)]  # [C, W, D]
        n_vis = (t + 1) // rate
        if topk_idx is not None:
            idx = topk_idx[c0:c1].long()
            cvalid = (idx >= 0) & (idx < n_vis[:, None])
        else:
            idx = torch.arange(comp_f.shape[0], device=dev)[None].expand(c1 - c0, -1)
            cvalid = idx < n_vis[:, None]
        keys = torch.cat([win.to(torch.bfloat16), comp_f[idx.clamp(min=0, max=comp_f.shape[0] - 1)]], 1)
        valid = torch.cat([wvalid, cvalid], 1)
        logits = torch.einsum("chd,cnd->chn", q[c0:c1], keys).float() * softmax_scale
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        full = torch.cat([logits, sink[None, :, None].expand(c1 - c0, -1, 1)], 2)
        p = torch.softmax(full, 2)[..., :-1].to(torch.bfloat16)
        o = torch.einsum("chn,cnd->chd", p, keys).float()
        out[c0:c1] = rotate_interleaved_ref(o, -(t.float()[:, None, None] * rope_inv_freq)).to(q.dtype)
    return out


def bench(model: ModelShape, context: int, s_len: int = 1024) -> list[BenchRow]:
    dev = bench_device()
    rows = []
    d, r, w = model.head_dim, model.rope_dim, model.window
    lay = MainLayout(d, r)
    s_len = min(s_len, context)
    start = context - s_len
    hist = min(start, w - 1)
    for mode in ("csa", "hca"):
        op = f"sparse_prefill.{mode}"
        cfg = f"{model.name} S={s_len} ctx={context}"
        rate, e = (model.csa_rate, model.csa_entries) if mode == "csa" else (model.hca_rate, model.hca_entries)
        n_max = context // rate
        blocks = -(-n_max // e)
        chunk_keys = w + (min(model.topk, n_max) if mode == "csa" else n_max)  # the torch baseline's per-query gather
        if not fits(dev, blocks * e * (lay.entry_bytes + d * 6) + 128 * chunk_keys * d * 8):
            rows.append(skipped(op, cfg, "does not fit in GPU memory"))
            continue
        gen = torch.Generator(device=dev)
        gen.manual_seed(context + s_len)
        comp = random_main_pages(blocks, e, d, r, dev, gen)
        table = torch.randperm(blocks, device=dev, generator=gen).to(torch.int32)
        topk = None
        if mode == "csa":
            k = min(model.topk, n_max)
            # per query: k distinct indices among its visible entries, -1 where fewer are visible
            vis = ((start + torch.arange(s_len, device=dev) + 1) // rate)[:, None]
            cand = (torch.rand(s_len, n_max, device=dev, generator=gen) + (torch.arange(n_max, device=dev)[None] >= vis) * 2)
            topk = cand.topk(k, dim=1, largest=False).indices
            topk = torch.where(topk < vis, topk, -1).to(torch.int32).contiguous()
        kw = dict(q=torch.randn(s_len, model.heads, d, device=dev, generator=gen).to(torch.bfloat16), start_pos=start,
                  kv=torch.randn(hist + s_len, d, device=dev, generator=gen).to(torch.bfloat16), window=w, comp=comp,
                  block_table=table, topk_idx=topk, rate=rate, sink=torch.randn(model.heads, device=dev, generator=gen),
                  softmax_scale=d**-0.5, rope_inv_freq=rope_inv_freq(r, dev))
        out = sparse_prefill(**kw)
        check_close(out, sparse_prefill_ref(**kw), f"{op} vs float32 reference")
        check_close(out, torch_sparse_prefill(**kw), f"{op} vs torch baseline", atol=5e-2, rtol=5e-2)
        us = time_us(lambda: sparse_prefill(**kw, out=out))
        ref_us = time_us(lambda: torch_sparse_prefill(**kw))
        t = start + torch.arange(s_len)
        win_keys = int((torch.minimum(t + 1, torch.full_like(t, w))).clamp(max=w).sum())
        comp_keys = int((topk >= 0).sum()) if topk is not None else int(((t + 1) // rate).sum())
        keys = win_keys + comp_keys
        nbytes = (hist + s_len) * d * 2 + comp_keys * lay.entry_bytes + 2 * s_len * model.heads * d * 2
        rows.append(BenchRow(op, cfg, us, bytes=nbytes, flops=sparse_decode_flops(model.heads, d, keys), ref_us=ref_us,
                             note="bytes count each query's compressed reads"))
        del kw, out, comp
    return rows
