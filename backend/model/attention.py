"""V4 attention: shared K=V head, 128-token window, CSA / HCA compressed entries, sink, grouped output.

Prefill runs one request's chunk (any start position, any length); decode runs one token for
each of B requests at their own positions. All request state lives in `SequenceState` block
tables and the `KVStorage` pages, both passed in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CSA, HCA, ModelConfig
from ..kv_cache.storage import KVStorage, SequenceState, gather_entries, store_entries
from . import ops
from .compressor import compress_chunk, compress_decode
from .decode_batch import DecodeBatch
from .layers import Linear, RMSNormWeight, empty_param, fuse_linears
from .sparse_attention import KeyGroup, attend, index_scores, select_topk


class Compressor(nn.Module):
    """Gated per-channel softmax pooling of `rate` tokens into one entry (overlapping for CSA)."""

    def __init__(self, cfg: ModelConfig, rate: int, width: int, overlap: bool, dtype: torch.dtype):
        super().__init__()
        self.rate, self.width, self.overlap, self.eps = rate, width, overlap, cfg.rms_norm_eps
        width_in = 2 * width if overlap else width
        self.wkv = Linear(cfg.hidden_size, width_in, dtype)
        self.wgate = Linear(cfg.hidden_size, width_in, dtype)
        self.ape = empty_param(rate, width_in, dtype=torch.float32)
        self.norm = RMSNormWeight(width)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and gate logits (with the position bias of each token's slot) [N, width_in]."""
        return self.wkv(x), self.wgate(x).float() + self.ape[positions % self.rate]

    def finish(self, pooled: torch.Tensor, anchors: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """RMSNorm then RoPE at each entry's anchor position (its first token)."""
        normed = ops.rms_norm(pooled, self.norm.weight, self.eps)
        cos, sin = ops.rope_cos_sin(anchors, inv_freq)
        return ops.apply_rope(normed, cos, sin)


class Indexer(nn.Module):
    """Lightning Indexer: its own compressor for 128-dim keys, scored by ReLU-weighted head sums."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.heads, self.dim, self.topk = cfg.index_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.heads * self.dim, dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.heads, dtype)
        self.compressor = Compressor(cfg, cfg.csa_rate, self.dim, overlap=True, dtype=dtype)

    def queries(self, c_q: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries `[N, heads, dim]` (rotated like the stored keys, if they are) and head weights."""
        q = self.wq_b(c_q).view(-1, self.heads, self.dim)
        q = ops.apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
        if rotation is not None:
            q = (q.float() @ rotation).to(q.dtype)
        return q, self.weights_proj(x).float() * self.heads**-0.5


def _pad_stack(rows: list[torch.Tensor], dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-request [n_b, dim] tensors into [B, max n, dim] plus a validity mask."""
    longest = max((r.shape[0] for r in rows), default=0)
    out = like.new_zeros(len(rows), longest, dim)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=like.device)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r.to(out.dtype)
        mask[b, : r.shape[0]] = True
    return out, mask


class Attention(nn.Module):
    QUERY_BLOCK = 128  # prefill queries per attention block: bounds the logits' memory

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, kind: str | None = None):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.kind = kind or cfg.layer_types[layer]
        self.rate = cfg.csa_rate if self.kind == CSA else cfg.hca_rate if self.kind == HCA else 0
        c, h = cfg.head_dim, cfg.num_heads
        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype)
        self.q_norm = RMSNormWeight(cfg.q_lora_rank)
        self.wq_b = Linear(cfg.q_lora_rank, h * c, dtype)
        self.wkv = Linear(cfg.hidden_size, c, dtype)
        self.kv_norm = RMSNormWeight(c)
        self.wo_a = Linear(h * c // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, dtype)
        self.attn_sink = empty_param(h, dtype=torch.float32)
        self.compressor = Compressor(cfg, self.rate, c, overlap=self.kind == CSA, dtype=dtype) if self.rate else None
        self.indexer = Indexer(cfg, dtype) if self.kind == CSA else None
        self.register_buffer("inv_freq", ops.layer_inv_freq(cfg, compressed=self.rate > 0), persistent=False)
        self.scale = c**-0.5
        # the kernel path's fused GEMMs: every projection of x, and of the q latent (views, no copies)
        x_rows = {"wq_a": self.wq_a, "wkv": self.wkv}
        if self.compressor is not None:
            x_rows.update(comp_wkv=self.compressor.wkv, comp_wgate=self.compressor.wgate)
        if self.indexer is not None:
            ic = self.indexer.compressor
            x_rows.update(index_wkv=ic.wkv, index_wgate=ic.wgate, index_weights=self.indexer.weights_proj)
        self.x_proj_names = tuple(x_rows)
        self.x_proj_sizes = [m.weight.shape[0] for m in x_rows.values()]
        self.register_buffer("x_proj", fuse_linears(list(x_rows.values())), persistent=False)
        cq_rows = [self.wq_b] + ([self.indexer.wq_b] if self.indexer is not None else [])
        self.register_buffer("cq_proj", fuse_linears(cq_rows), persistent=False)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries [N, H, c] (head-normalised, RoPE'd), shared K=V [N, c], q latent [N, d_q], cos, sin."""
        cfg = self.cfg
        c_q = ops.rms_norm(self.wq_a(x), self.q_norm.weight, cfg.rms_norm_eps)
        q = ops.head_rms_norm(self.wq_b(c_q).view(-1, cfg.num_heads, cfg.head_dim), cfg.rms_norm_eps)
        cos, sin = ops.rope_cos_sin(positions, self.inv_freq)
        q = ops.apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
        kv = ops.apply_rope(ops.rms_norm(self.wkv(x), self.kv_norm.weight, cfg.rms_norm_eps), cos, sin)
        return q, kv, c_q, cos, sin

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Inverse RoPE at the query position, then the grouped low-rank output projection."""
        return self._grouped_output(ops.apply_rope(o, cos.unsqueeze(1), sin.unsqueeze(1), inverse=True))

    def _grouped_output(self, o: torch.Tensor) -> torch.Tensor:
        """o [N, H, c] -> per-group low-rank projection -> [N, d]."""
        cfg = self.cfg
        grouped = o.reshape(o.shape[0], cfg.o_groups, -1)
        w = self.wo_a.weight.view(cfg.o_groups, cfg.o_lora_rank, -1)
        return self.wo_b(torch.einsum("ngi,goi->ngo", grouped.to(w.dtype), w).flatten(1))

    # prefill: one request, tokens seq.position .. seq.position + S - 1

    def prefill(self, x: torch.Tensor, seq: SequenceState, kv_store: KVStorage) -> torch.Tensor:
        """Reference path (the kernel path is `kernel_path.prefill`)."""
        window = self.cfg.window
        start, count = seq.position, x.shape[0]
        positions = torch.arange(start, start + count, device=x.device)
        q, kv, c_q, cos, sin = self._project(x, positions)
        ring = kv_store.ring[self.layer]
        history = min(start, window - 1)
        hist_pos = torch.arange(start - history, start, device=x.device)
        hist = ring.read(torch.full_like(hist_pos, seq.ring_block), hist_pos % window)
        # this chunk's keys exactly as they will read back from the cache (FP8 / bf16 storage)
        raw = torch.cat([hist.to(kv.dtype), ring.round_trip(kv)])
        raw_pos = torch.cat([hist_pos, positions])
        tail = positions[-window:]
        ring.write(torch.full_like(tail, seq.ring_block), tail % window, kv[-tail.shape[0]:])

        comp_keys = picks = None
        if self.compressor is not None:
            comp_keys = self._compress_prefill(self.compressor, x, positions, seq, kv_store.comp, kv_store.acc,
                                               kv_store.comp_blocks(seq, self.layer))
        if self.indexer is not None:
            idx_keys = self._compress_prefill(self.indexer.compressor, x, positions, seq, kv_store.index,
                                              kv_store.index_acc, seq.csa_index_blocks)
            iq, iw = self.indexer.queries(c_q, x, cos, sin, kv_store.index[self.layer].rotation)
            scores = index_scores(iq, iw, idx_keys, self.indexer.dim)
            picks = select_topk(scores, (positions + 1) // self.rate, self.indexer.topk)

        out = torch.empty_like(q)
        for lo in range(0, count, self.QUERY_BLOCK):
            hi = min(lo + self.QUERY_BLOCK, count)
            t = positions[lo:hi].view(-1, 1)
            groups = [KeyGroup(raw, (raw_pos.view(1, -1) <= t) & (raw_pos.view(1, -1) > t - window))]
            if comp_keys is not None and comp_keys.shape[0]:
                if picks is None:  # HCA: every entry whose window has closed
                    entry = torch.arange(comp_keys.shape[0], device=x.device).view(1, -1)
                    groups.append(KeyGroup(comp_keys.to(q.dtype), entry < (t + 1) // self.rate))
                elif picks.shape[1]:
                    p = picks[lo:hi]
                    groups.append(KeyGroup(comp_keys[p.clamp(min=0)].to(q.dtype), p >= 0))
            out[lo:hi] = attend(q[lo:hi], groups, self.attn_sink, self.scale)
        return self._output(out, cos, sin)

    def _compress_prefill(self, comp: Compressor, x, positions, seq, pools, accs, blocks: list[int]) -> torch.Tensor:
        """Advance one compressor over the chunk, store emitted entries; return all entries so far."""
        a, z = comp.project(x, positions)
        state = accs[self.layer][seq.state_block]
        emitted = compress_chunk(a, z, seq.position, comp.rate, state, comp.overlap)
        state.copy_(emitted.state)
        n_new = emitted.pooled.shape[0]
        if n_new:
            anchors = (torch.arange(n_new, device=x.device) + emitted.first_entry) * comp.rate
            entries = comp.finish(emitted.pooled, anchors, self.inv_freq)
            store_entries(pools[self.layer], blocks, emitted.first_entry, entries)
        total = (seq.position + x.shape[0]) // comp.rate
        return gather_entries(pools[self.layer], blocks, total)

    # decode: one token per request, each at its own position

    def decode(self, x: torch.Tensor, batch: DecodeBatch, kv_store: KVStorage) -> torch.Tensor:
        """Reference path: reads the host state in `batch.seqs` (the kernel path is `kernel_path.decode`)."""
        seqs = list(batch.seqs)
        window = self.cfg.window
        positions = torch.tensor([s.position for s in seqs], device=x.device)
        q, kv, c_q, cos, sin = self._project(x, positions)
        ring = kv_store.ring[self.layer]
        ring_blocks = torch.tensor([s.ring_block for s in seqs], device=x.device)
        ring.write(ring_blocks, positions % window, kv)
        slots = torch.arange(window, device=x.device).view(1, -1)
        slot_pos = positions.view(-1, 1) - (positions.view(-1, 1) - slots) % window
        groups = [KeyGroup(ring.read_pages(ring_blocks).to(q.dtype), slot_pos >= 0)]

        if self.compressor is not None:
            main_tables = [kv_store.comp_blocks(s, self.layer) for s in seqs]
            counts = self._compress_decode(self.compressor, x, positions, seqs, kv_store.comp, kv_store.acc, main_tables)
            pool = kv_store.comp[self.layer]
            entries = [gather_entries(pool, t, n) for t, n in zip(main_tables, counts)]
            if self.indexer is None:
                keys, visible = _pad_stack(entries, self.cfg.head_dim, q)
                groups.append(KeyGroup(keys, visible))
            else:
                picks = self._select_decode(x, c_q, cos, sin, positions, seqs, kv_store)
                if picks.shape[1]:
                    chosen = [e[p.clamp(min=0)] if e.shape[0] else e.new_zeros(p.shape[0], e.shape[1]) for e, p in zip(entries, picks)]
                    groups.append(KeyGroup(torch.stack(chosen).to(q.dtype), picks >= 0))
        out = attend(q, groups, self.attn_sink, self.scale)
        return self._output(out, cos, sin)

    def _compress_decode(self, comp: Compressor, x, positions, seqs, pools, accs, tables: list[list[int]]) -> list[int]:
        a, z = comp.project(x, positions)
        state_blocks = torch.tensor([s.state_block for s in seqs], device=x.device)
        acc = accs[self.layer]
        result = compress_decode(a, z, positions, comp.rate, acc[state_blocks], comp.overlap)
        acc[state_blocks] = result.state
        rows = result.emit.nonzero().flatten().tolist()
        if rows:
            anchors = positions[rows] + 1 - comp.rate
            entries = comp.finish(result.pooled[rows], anchors, self.inv_freq)
            for i, b in enumerate(rows):
                store_entries(pools[self.layer], tables[b], int(positions[b] + 1) // comp.rate - 1, entries[i : i + 1])
        return [int(p + 1) // comp.rate for p in positions]

    def _select_decode(self, x, c_q, cos, sin, positions, seqs, kv_store) -> torch.Tensor:
        """Indexer picks per request [B, min(k, max entries)], -1 where a request has fewer."""
        tables = [s.csa_index_blocks for s in seqs]
        counts = self._compress_decode(self.indexer.compressor, x, positions, seqs, kv_store.index, kv_store.index_acc, tables)
        pool = kv_store.index[self.layer]
        keys = [gather_entries(pool, t, n) for t, n in zip(tables, counts)]
        padded, _ = _pad_stack(keys, self.indexer.dim, x.float())
        iq, iw = self.indexer.queries(c_q, x, cos, sin, pool.rotation)
        scores = index_scores(iq, iw, padded, self.indexer.dim)
        return select_topk(scores, torch.tensor(counts, device=x.device), self.indexer.topk)
