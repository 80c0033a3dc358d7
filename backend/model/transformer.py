"""The V4 decoder: embedding -> n_hc streams -> blocks (attention and MoE sites, each wrapped in mHC)
-> hyper-head -> norm -> head. Parameter names follow the release (`layers.0.attn.wq_a.weight`, ...).

`prefill` advances one request by a chunk of any length from its current position, `prefill_batch`
several requests by a chunk each in one pass; `decode` advances B requests by one token each. Neither allocates cache blocks: the caller reserves
them (see `kv_cache`), so the forward never fails half-way for lack of memory.

Two paths share the weights: the PyTorch reference (CPU, the oracle) and the kernel path (a CUDA
cache: fused attention, mHC and MoE kernels, grouped expert GEMMs). The choice is made once per
call from the storage, never per layer. `decode_batch` on the kernel path reads only device
tensors and never waits for the host, so a step can be captured as one CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.kernels.host_copy import to_device

from ..config import ROUTED_MOE, SWA, ModelConfig
from ..kv_cache.storage import KVStorage, SequenceState
from . import kernel_path, ops
from .attention import Attention
from .decode_batch import DecodeBatch
from .prefill_inputs import PassInputs
from .hyper import hc_collapse, hc_expand, hc_head, hc_weights
from .layers import Linear, RMSNormWeight, empty_param
from .moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, kind: str | None = None, mlp: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg, layer, dtype, kind)
        self.ffn = MoE(cfg, mlp or cfg.mlp_types[layer], dtype)
        self.attn_norm = RMSNormWeight(cfg.hidden_size)
        self.ffn_norm = RMSNormWeight(cfg.hidden_size)
        mix = (2 + cfg.hc_mult) * cfg.hc_mult
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", empty_param(mix, cfg.hc_mult * cfg.hidden_size, dtype=torch.float32))
            setattr(self, f"hc_{site}_base", empty_param(mix, dtype=torch.float32))
            setattr(self, f"hc_{site}_scale", empty_param(3, dtype=torch.float32))

    def forward(self, streams: torch.Tensor, token_ids: torch.Tensor, attend) -> torch.Tensor:
        """Reference path: streams [N, n_hc, d]; `attend(x [N, d]) -> [N, d]` runs this layer's attention."""
        eps = self.cfg.rms_norm_eps
        w = hc_weights(streams, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.cfg)
        y = attend(ops.rms_norm(hc_collapse(streams, w.pre), self.attn_norm.weight, eps))
        streams = hc_expand(streams, y, w)
        w = hc_weights(streams, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.cfg)
        y = self.ffn(ops.rms_norm(hc_collapse(streams, w.pre), self.ffn_norm.weight, eps), token_ids)
        return hc_expand(streams, y, w)

    def forward_fused(self, streams: torch.Tensor, flat: torch.Tensor | None, token_ids: torch.Tensor, attend):
        """The kernel path: (streams, their float32 flattening or None) -> the same after this block."""
        from dsv4.kernels.mhc.kernel import hc_post

        x, post, comb = fused_collapse(streams, flat, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale,
                                       self.attn_norm.weight, self.cfg)
        streams, flat = hc_post(streams, attend(x), post, comb, flat=True)
        x, post, comb = fused_collapse(streams, flat, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale,
                                       self.ffn_norm.weight, self.cfg)
        return hc_post(streams, self.ffn(x, token_ids, grouped=True), post, comb, flat=True)


def fused_collapse(streams: torch.Tensor, flat: torch.Tensor | None, fn: torch.Tensor, base: torch.Tensor,
                   scale: torch.Tensor, norm_weight: torch.Tensor, cfg: ModelConfig, head: bool = False):
    """mHC weights + collapse + RMSNorm on the kernels: one GEMM for the mixing logits (over the streams'
    float32 flattening, `flat`, when the previous kernel wrote it), one kernel for the rest."""
    from dsv4.kernels.mhc.kernel import hc_pre

    mixes = F.linear(streams.flatten(1).float() if flat is None else flat, fn)
    return hc_pre(streams, mixes, base, scale, norm_weight, iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                  norm_eps=cfg.rms_norm_eps, head=head)


class MTPBlock(Block):
    """Multi-token-prediction block (sliding-window attention, routed MoE); weights loaded for speculation."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(cfg, cfg.num_layers, dtype, kind=SWA, mlp=ROUTED_MOE)
        d = cfg.hidden_size
        self.e_proj = Linear(d, d, dtype)
        self.h_proj = Linear(d, d, dtype)
        self.enorm = RMSNormWeight(d)
        self.hnorm = RMSNormWeight(d)
        self.norm = RMSNormWeight(d)
        self.hc_head_fn = empty_param(cfg.hc_mult, cfg.hc_mult * d, dtype=torch.float32)
        self.hc_head_base = empty_param(cfg.hc_mult, dtype=torch.float32)
        self.hc_head_scale = empty_param(1, dtype=torch.float32)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = empty_param(vocab, dim, dtype=dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        d = cfg.hidden_size
        self.embed = Embedding(cfg.vocab_size, d, dtype)
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNormWeight(d)
        self.hc_head_fn = empty_param(cfg.hc_mult, cfg.hc_mult * d, dtype=torch.float32)
        self.hc_head_base = empty_param(cfg.hc_mult, dtype=torch.float32)
        self.hc_head_scale = empty_param(1, dtype=torch.float32)
        self.head = Linear(d, cfg.vocab_size, dtype)
        self.mtp = nn.ModuleList(MTPBlock(cfg, dtype) for _ in range(cfg.num_mtp_layers))
        self.compress_rates = tuple(sorted({cfg.compress_rate(i) for i in range(cfg.num_layers)} - {0}))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _streams(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed.weight[token_ids]
        return x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()

    def _run_blocks(self, token_ids: torch.Tensor, attend, kernels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every block; `attend(attention module, x)` is the chosen path's attention."""
        streams, flat = self._streams(token_ids), None
        for block in self.layers:
            layer_attend = lambda x, a=block.attn: attend(a, x)  # noqa: E731
            if kernels:
                streams, flat = block.forward_fused(streams, flat, token_ids, layer_attend)
            else:
                streams = block(streams, token_ids, layer_attend)
        return streams, flat

    def _logits(self, streams: torch.Tensor, flat: torch.Tensor | None, kernels: bool) -> torch.Tensor:
        if kernels:
            x, _, _ = fused_collapse(streams, flat, self.hc_head_fn, self.hc_head_base, self.hc_head_scale,
                                     self.norm.weight, self.cfg, head=True)
        else:
            x = hc_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.cfg)
            x = ops.rms_norm(x, self.norm.weight, self.cfg.rms_norm_eps)
        return self.head(x).float()

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, seq: SequenceState, kv_store: KVStorage, all_logits: bool = False) -> torch.Tensor:
        """Run tokens seq.position .. +S-1 of one request; returns logits [S, V] or [1, V] (last)."""
        return self.prefill_batch([(token_ids, seq)], kv_store, all_logits)

    @torch.inference_mode()
    def prefill_batch(self, chunks: list[tuple[torch.Tensor, SequenceState]], kv_store: KVStorage,
                      all_logits: bool = False) -> torch.Tensor:
        """One chunk of each of several requests in one pass: the token-wise work (mHC, MoE, head) runs
        over all their tokens at once, attention per request from its own position (on the kernel path
        each attention kernel once for all of them). Returns each
        request's last logits [R, V] (or every position's, concatenated, when `all_logits`)."""
        if not chunks or any(t.shape[0] == 0 for t, _ in chunks):
            raise ValueError("prefill_batch needs at least one request and no empty chunk")
        kernels = kv_store.use_kernels
        lengths = [t.shape[0] for t, _ in chunks]
        token_ids = chunks[0][0] if len(chunks) == 1 else torch.cat([t for t, _ in chunks])
        seqs = [seq for _, seq in chunks]
        if kernels:  # the pass's positions, window rows and tables, once for every layer
            inputs = PassInputs.build(seqs, lengths, self.cfg.window, self.compress_rates, token_ids.device)

            def attend(a, x):
                return kernel_path.prefill_pass(a, x, kv_store, inputs)
        else:
            def attend(a, x):
                if len(seqs) == 1:
                    return Attention.prefill(a, x, seqs[0], kv_store)
                parts = x.split(lengths)
                return torch.cat([Attention.prefill(a, part, seq, kv_store) for part, seq in zip(parts, seqs)])

        streams, flat = self._run_blocks(token_ids, attend, kernels)
        for (_, seq), n in zip(chunks, lengths):
            seq.position += n
        if not all_logits:
            last = to_device(lengths, torch.long, token_ids.device).cumsum(0) - 1
            streams, flat = streams[last], flat[last] if flat is not None else None
        return self._logits(streams, flat, kernels)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, seqs: list[SequenceState], kv_store: KVStorage) -> torch.Tensor:
        """One token per request at each request's own position; returns logits [B, V]."""
        logits = self.decode_batch(token_ids, DecodeBatch.from_seqs(seqs, self.device), kv_store)
        for s in seqs:
            s.position += 1
        return logits

    @torch.inference_mode()
    def decode_batch(self, token_ids: torch.Tensor, batch: DecodeBatch, kv_store: KVStorage) -> torch.Tensor:
        """One decode step over prepared inputs (positions are not advanced: the caller does that).

        token_ids: `[B]` int64 on the model's device; returns logits `[B, V]` float32.
        """
        kernels = kv_store.use_kernels
        decode_attn = kernel_path.decode if kernels else Attention.decode
        if kernels:
            batch = batch.with_counts(self.compress_rates)
        streams, flat = self._run_blocks(token_ids, lambda a, x: decode_attn(a, x, batch, kv_store), kernels)
        return self._logits(streams, flat, kernels)
