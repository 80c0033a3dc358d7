"""The attention layer on the fused Triton kernels (the path a CUDA cache takes).

Same math, weights and cache layout as the reference code in `attention.py`: the kernels read
the page pools through the block tables directly, update the compressor accumulators in place,
and apply the inverse RoPE in the attention epilogue. Projections stay in PyTorch.
"""

from __future__ import annotations

import torch

from ..kv_cache.storage import KVStorage, SequenceState


def _tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block tables padded with the null block into `[B, max_blocks]` int32."""
    width = max((len(t) for t in tables), default=0) or 1
    out = torch.zeros(len(tables), width, dtype=torch.int32)
    for b, t in enumerate(tables):
        out[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(device)


def _key_format(pool) -> str | None:
    return pool.fmt[len("index_"):] if pool.packed else None


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def decode(attn, x: torch.Tensor, seqs: list[SequenceState], kv_store: KVStorage) -> torch.Tensor:
    from dsv4.kernels.compressor import compressor_decode
    from dsv4.kernels.indexer_topk import indexer_topk_decode
    from dsv4.kernels.sparse_decode import sparse_decode

    device, layer, cfg = x.device, attn.layer, attn.cfg
    positions = torch.tensor([s.position for s in seqs], dtype=torch.int64, device=device)
    q, kv, c_q, cos, sin = attn._project(x, positions)
    ring = kv_store.ring[layer]
    ring_blocks = _ids([s.ring_block for s in seqs], device)
    ring.write(ring_blocks.long(), positions % cfg.window, kv)
    comp = table = num_comp = picks = None
    if attn.compressor is not None:
        c, state_blocks = attn.compressor, _ids([s.state_block for s in seqs], device)
        comp, table = kv_store.comp[layer], _tables([kv_store.comp_blocks(s, layer) for s in seqs], device)
        compressor_decode(c.wkv(x), c.wgate(x), c.ape, c.norm.weight, attn.inv_freq, kv_store.acc[layer], state_blocks,
                          positions, comp.tensor, table, rate=c.rate, eps=c.eps, entry_format=comp.entry_format)
        num_comp = ((positions + 1) // c.rate).to(torch.int32)
        if attn.indexer is not None:
            index, ic = kv_store.index[layer], attn.indexer.compressor
            index_table = _tables([s.csa_index_blocks for s in seqs], device)
            compressor_decode(ic.wkv(x), ic.wgate(x), ic.ape, ic.norm.weight, attn.inv_freq, kv_store.index_acc[layer],
                              state_blocks, positions, index.tensor, index_table, rate=ic.rate, eps=ic.eps,
                              entry_format=index.entry_format, hadamard=index.rotation)
            iq, iw = attn.indexer.queries(c_q, x, cos, sin, index.rotation)
            picks = indexer_topk_decode(iq.contiguous(), iw.contiguous(), index.tensor, index_table, num_comp,
                                        attn.indexer.topk, key_format=_key_format(index))
    o = sparse_decode(q.contiguous(), positions, ring.tensor, ring_blocks, comp.tensor if comp else None, table, num_comp,
                      picks, attn.attn_sink, attn.scale, attn.inv_freq)
    return attn._grouped_output(o)


def prefill(attn, x: torch.Tensor, seq: SequenceState, kv_store: KVStorage) -> torch.Tensor:
    from dsv4.kernels.compressor import compressor_prefill
    from dsv4.kernels.indexer_topk import indexer_topk_prefill
    from dsv4.kernels.sparse_prefill import sparse_prefill

    device, layer, window = x.device, attn.layer, attn.cfg.window
    start, count = seq.position, x.shape[0]
    positions = torch.arange(start, start + count, device=device)
    q, kv, c_q, cos, sin = attn._project(x, positions)
    ring = kv_store.ring[layer]
    history = min(start, window - 1)
    hist_pos = torch.arange(start - history, start, device=device)
    hist = ring.read(torch.full_like(hist_pos, seq.ring_block), hist_pos % window)
    raw = torch.cat([hist.to(kv.dtype), ring.round_trip(kv)]).contiguous()
    tail = positions[-window:]
    ring.write(torch.full_like(tail, seq.ring_block), tail % window, kv[-tail.shape[0]:])
    comp = table = picks = None
    rate = attn.rate or 1
    if attn.compressor is not None:
        c = attn.compressor
        comp, table = kv_store.comp[layer], _tables([kv_store.comp_blocks(seq, layer)], device)[0]
        compressor_prefill(c.wkv(x), c.wgate(x), c.ape, c.norm.weight, attn.inv_freq, kv_store.acc[layer], seq.state_block,
                           start, comp.tensor, table, rate=c.rate, eps=c.eps, entry_format=comp.entry_format)
        if attn.indexer is not None:
            index, ic = kv_store.index[layer], attn.indexer.compressor
            index_table = _tables([seq.csa_index_blocks], device)[0]
            compressor_prefill(ic.wkv(x), ic.wgate(x), ic.ape, ic.norm.weight, attn.inv_freq, kv_store.index_acc[layer],
                               seq.state_block, start, index.tensor, index_table, rate=ic.rate, eps=ic.eps,
                               entry_format=index.entry_format, hadamard=index.rotation)
            iq, iw = attn.indexer.queries(c_q, x, cos, sin, index.rotation)
            picks = indexer_topk_prefill(iq.contiguous(), iw.contiguous(), index.tensor, index_table, start,
                                         attn.indexer.topk, rate=ic.rate, key_format=_key_format(index))
    o = sparse_prefill(q.contiguous(), start, raw, window, comp.tensor if comp else None, table, picks, rate,
                       attn.attn_sink, attn.scale, attn.inv_freq)
    return attn._grouped_output(o)
