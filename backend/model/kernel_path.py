"""The attention layer on the fused Triton kernels (the path a CUDA cache takes).

Same math, weights and cache layout as the reference code in `attention.py`. Every projection of
the layer input is one GEMM (`attn.x_proj`: q latent, K=V, both compressors' values and gates,
the indexer's head weights) and every projection of the q latent another (`attn.cq_proj`: queries
and index queries); the kernels then normalise and rotate in place of the reference's chains of
small ops, write the window ring directly, read the page pools through the block tables, update
the compressor accumulators in place and apply the inverse RoPE in the attention epilogue.

Decode reads nothing but device tensors (`DecodeBatch`), so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv_cache.storage import KVStorage, SequenceState
from .decode_batch import DecodeBatch
from .prefill_inputs import PassInputs


def _key_format(pool) -> str | None:
    return pool.fmt[len("index_"):] if pool.packed else None


def _split_x(attn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer input's fused projection, split into named column views `[N, width]`."""
    return dict(zip(attn.x_proj_names, F.linear(x, attn.x_proj).split(attn.x_proj_sizes, dim=1)))


def _queries(attn, proj: dict[str, torch.Tensor], positions: torch.Tensor):
    """(queries [N, H, c], q latent [N, d_q], index queries [N, n_I, c_I] or None)."""
    from dsv4.kernels.norm_rope.kernel import head_norm_rope, rms_norm_rows

    cfg = attn.cfg
    c_q = rms_norm_rows(proj["wq_a"], attn.q_norm.weight, cfg.rms_norm_eps)
    qp = F.linear(c_q, attn.cq_proj)
    heads_width = cfg.num_heads * cfg.head_dim
    q = head_norm_rope(qp[:, :heads_width], positions, attn.inv_freq, num_heads=cfg.num_heads, eps=cfg.rms_norm_eps)
    iq = None
    if attn.indexer is not None:
        iq = head_norm_rope(qp[:, heads_width:], positions, attn.inv_freq, num_heads=attn.indexer.heads, normalize=False)
    return q, c_q, iq


def _rotated(iq: torch.Tensor, pool) -> torch.Tensor:
    """Index queries rotated like FP4-stored keys (unchanged for the other formats)."""
    return iq if pool.rotation is None else (iq.float() @ pool.rotation).to(iq.dtype)


def decode(attn, x: torch.Tensor, batch: DecodeBatch, kv_store: KVStorage) -> torch.Tensor:
    from dsv4.kernels.compressor.kernel import compressor_decode
    from dsv4.kernels.indexer_topk.kernel import indexer_topk_decode
    from dsv4.kernels.norm_rope.kernel import kv_norm_rope
    from dsv4.kernels.sparse_decode.kernel import sparse_decode

    layer, cfg, positions = attn.layer, attn.cfg, batch.positions
    proj = _split_x(attn, x)
    q, _, iq = _queries(attn, proj, positions)
    ring = kv_store.ring[layer]
    kv_norm_rope(proj["wkv"], positions, attn.inv_freq, attn.kv_norm.weight, cfg.rms_norm_eps,
                 ring=ring.tensor, ring_blocks=batch.ring_blocks, window=cfg.window)
    comp = table = num_comp = picks = None
    if attn.compressor is not None:
        c = attn.compressor
        comp = kv_store.comp[layer]
        table = batch.csa_table if attn.indexer is not None else batch.hca_table
        num_comp = batch.visible(c.rate)
        compressor_decode(proj["comp_wkv"], proj["comp_wgate"], c.ape, c.norm.weight, attn.inv_freq, kv_store.acc[layer],
                          batch.state_blocks, positions, comp.tensor, table, rate=c.rate, eps=c.eps,
                          entry_format=comp.entry_format)
        if attn.indexer is not None:
            index, ic = kv_store.index[layer], attn.indexer.compressor
            compressor_decode(proj["index_wkv"], proj["index_wgate"], ic.ape, ic.norm.weight, attn.inv_freq,
                              kv_store.index_acc[layer], batch.state_blocks, positions, index.tensor,
                              batch.csa_index_table, rate=ic.rate, eps=ic.eps, entry_format=index.entry_format,
                              hadamard=index.rotation)
            picks = indexer_topk_decode(_rotated(iq, index), proj["index_weights"], index.tensor, batch.csa_index_table,
                                        num_comp, attn.indexer.topk, key_format=_key_format(index),
                                        w_scale=attn.indexer.heads**-0.5)
    o = sparse_decode(q, positions, ring.tensor, batch.ring_blocks, comp.tensor if comp else None, table, num_comp,
                      picks, attn.attn_sink, attn.scale, attn.inv_freq)
    return attn._grouped_output(o)


def prefill(attn, x: torch.Tensor, seq: SequenceState, kv_store: KVStorage) -> torch.Tensor:
    """One prompt's chunk through the layer (`prefill_pass` with one prompt)."""
    rates = [r for r in (attn.rate, attn.indexer.compressor.rate if attn.indexer is not None else 0) if r]
    inputs = PassInputs.build([seq], [x.shape[0]], attn.cfg.window, rates, x.device)
    return prefill_pass(attn, x, kv_store, inputs)


def prefill_pass(attn, x: torch.Tensor, kv_store: KVStorage, inputs: PassInputs) -> torch.Tensor:
    """Several prompts' chunks (x: their tokens end to end) through the layer, one launch of each
    kernel for all of them."""
    from dsv4.kernels.compressor.kernel import compressor_prefill_batch
    from dsv4.kernels.indexer_topk.kernel import indexer_topk_prefill_batch
    from dsv4.kernels.norm_rope.kernel import kv_norm_rope
    from dsv4.kernels.sparse_prefill.kernel import sparse_prefill_batch

    layer, cfg = attn.layer, attn.cfg
    proj = _split_x(attn, x)
    q, _, iq = _queries(attn, proj, inputs.positions)
    kv = kv_norm_rope(proj["wkv"], inputs.positions, attn.inv_freq, attn.kv_norm.weight, cfg.rms_norm_eps)
    ring = kv_store.ring[layer]
    # every prompt's window history, then the chunks' keys as stored: raw windows in prompt order
    raw = torch.cat([ring.read(inputs.hist_blocks, inputs.hist_slots).to(kv.dtype), ring.round_trip(kv)])
    raw = raw.contiguous() if inputs.raw_order is None else raw.index_select(0, inputs.raw_order)
    ring.write(inputs.tail_blocks, inputs.tail_slots, kv.index_select(0, inputs.tail_rows))
    comp = tables = picks = num_comp = None
    max_comp = 0
    if attn.compressor is not None:
        c = attn.compressor
        comp = kv_store.comp[layer]
        tables = inputs.comp_table(csa=attn.indexer is not None)
        num_comp, max_comp = inputs.visible[c.rate]
        compressor_prefill_batch(proj["comp_wkv"], proj["comp_wgate"], c.ape, c.norm.weight, attn.inv_freq,
                                 kv_store.acc[layer], inputs.spans, comp.tensor, tables, rate=c.rate, eps=c.eps,
                                 entry_format=comp.entry_format)
        if attn.indexer is not None:
            index, ic = kv_store.index[layer], attn.indexer.compressor
            compressor_prefill_batch(proj["index_wkv"], proj["index_wgate"], ic.ape, ic.norm.weight, attn.inv_freq,
                                     kv_store.index_acc[layer], inputs.spans, index.tensor, inputs.csa_index_table,
                                     rate=ic.rate, eps=ic.eps, entry_format=index.entry_format, hadamard=index.rotation)
            index_visible, index_max = inputs.visible[ic.rate]
            picks = indexer_topk_prefill_batch(_rotated(iq, index), proj["index_weights"], index.tensor,
                                               inputs.csa_index_table, inputs.requests, index_visible, index_max,
                                               attn.indexer.topk, key_format=_key_format(index),
                                               w_scale=attn.indexer.heads**-0.5)
            max_comp = attn.indexer.topk
    o = sparse_prefill_batch(q, inputs.positions, inputs.requests, raw, inputs.win_lo, inputs.win_base, cfg.window,
                             comp.tensor if comp else None, tables, num_comp, picks, max_comp,
                             attn.attn_sink, attn.scale, attn.inv_freq)
    return attn._grouped_output(o)
