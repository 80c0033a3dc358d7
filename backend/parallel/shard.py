"""Slice a loaded full model, in place, into one rank's shard (weights only; no collectives here).

- Attention (TP): the query heads (`wq_b` rows, `attn_sink`) and the grouped output projection
  over them: `wo_a` keeps the rank's groups (or, when ranks outnumber groups, its heads' columns of
  one group) and `wo_b` those groups' columns, so the ranks' `wo_b` outputs sum to the full one.
  The layer's `cfg` becomes the shard's shape (its heads and output groups), which is all the
  attention code reads to size queries and the output projection.
- The shared K=V head, its compressor and the indexer stay whole on every rank: one head cannot be
  split by heads, and splitting the indexer's heads would need an all-reduce of its scores before
  every top-k. So every rank writes the same KV cache (a replica, not a shard).
- MoE: EP gives each rank E/W whole experts (the others become `AbsentExpert`); TP without EP
  splits every routed expert's intermediate width; TP splits the shared expert's width, and EP
  alone keeps the shared expert on rank 0 only, so the summed output counts it once.
- Embedding, mHC, router, norms and head are replicated (a vocabulary-split head would need a gather).
- The kernel path's fused weights follow: the q-latent projection is fused again from the rank's
  query rows, and the grouped MoE stacks the rank's routed experts only (`MoE.restack`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..model.attention import Attention
from ..model.layers import fuse_linears
from ..model.moe import Expert, MoE
from ..model.transformer import Transformer
from .group import ParallelConfig
from .modules import AbsentExpert


def _param(t: torch.Tensor) -> nn.Parameter:
    # a copy, not a view: the full tensor it came from can be freed
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


def _part(t: torch.Tensor, dim: int, parts: int, index: int) -> nn.Parameter:
    size = t.shape[dim] // parts
    return _param(t.narrow(dim, index * size, size))


def shard_attention(attn: Attention, parts: int, index: int) -> None:
    """The `index`-th of `parts` runs of consecutive heads: their queries and sinks, their groups' rows
    of `wo_a` (`[groups * latent, heads_per_group * c]`, group-major) restricted to these heads' input
    columns, and those groups' columns of `wo_b`."""
    cfg = attn.cfg
    heads, per_group, c, latent = cfg.num_heads // parts, cfg.heads_per_group, cfg.head_dim, cfg.o_lora_rank
    first_head = index * heads
    attn.wq_b.weight = _part(attn.wq_b.weight, 0, parts, index)
    attn.attn_sink = _part(attn.attn_sink, 0, parts, index)
    groups = max(1, heads // per_group)  # whole groups, or the one group these heads are part of
    first_group = first_head // per_group
    columns = slice((first_head % per_group) * c, (first_head % per_group + min(heads, per_group)) * c)
    wo_a = attn.wo_a.weight.view(cfg.o_groups, latent, per_group * c)[first_group:first_group + groups, :, columns]
    attn.wo_a.weight = _param(wo_a.reshape(groups * latent, -1))
    attn.wo_b.weight = _param(attn.wo_b.weight[:, first_group * latent:(first_group + groups) * latent])
    attn.cfg = replace(cfg, num_heads=heads, o_groups=groups)
    # the kernel path's fused projection of the q latent: this rank's queries, then the (whole) index queries
    cq_rows = [attn.wq_b] + ([attn.indexer.wq_b] if attn.indexer is not None else [])
    attn.register_buffer("cq_proj", fuse_linears(cq_rows, keep_values=True), persistent=False)


def keep_expert_part(expert: Expert, parts: int, index: int) -> None:
    """The rank's slice of the intermediate width (gate and up rows, down columns); parts=1 keeps it whole."""
    expert.w1.weight = _part(expert.w1.weight, 0, parts, index)
    expert.w3.weight = _part(expert.w3.weight, 0, parts, index)
    expert.w2.weight = _part(expert.w2.weight, 1, parts, index)


def shard_moe(moe: MoE, parallel: ParallelConfig, rank: int) -> None:
    tp, ep = parallel.tensor_parallel, parallel.expert_parallel
    num_experts = len(moe.experts)
    if ep > 1:
        per_rank = num_experts // ep
        first, count = rank * per_rank, per_rank
        for e in range(num_experts):
            if e // per_rank == rank:
                keep_expert_part(moe.experts[e], 1, 0)
            else:
                moe.experts[e] = AbsentExpert()
    else:
        first, count = 0, num_experts
        for expert in moe.experts:
            keep_expert_part(expert, tp, rank)
    if tp > 1:
        keep_expert_part(moe.shared_experts, tp, rank)
    elif rank == 0:
        keep_expert_part(moe.shared_experts, 1, 0)
    else:
        moe.shared_experts = AbsentExpert()
    # the grouped path (kernel path) stacks the rank's routed experts only; the full stack is dropped
    moe.restack(first, count)


def shard_model(model: Transformer, parallel: ParallelConfig, rank: int) -> Transformer:
    """Turn a full model into rank `rank`'s shard of `parallel` (refused for shapes or devices it cannot split)."""
    if not parallel.enabled:
        return model
    parallel.check_model(model.cfg)
    parallel.check_device(model.device)
    if not 0 <= rank < parallel.world_size:
        raise ValueError(f"rank {rank} outside a world of {parallel.world_size}")
    for block in [*model.layers, *model.mtp]:
        if parallel.tensor_parallel > 1:
            shard_attention(block.attn, parallel.tensor_parallel, rank)
        shard_moe(block.ffn, parallel, rank)
    return model
