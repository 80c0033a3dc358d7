"""Mixture of experts: hash routing (first layers) or sqrt-softplus scores with a selection bias.

Two paths over the same weights, both through `forward` (so hooks see either). The reference
(`loop`) loops over the experts a batch uses. The grouped path (`grouped`, the kernel path) routes
on the device, sorts token-expert pairs by expert and runs two grouped GEMMs over all experts at
once, the shared expert included as group E: no host synchronisation and no per-expert launches,
whatever the expert count. The experts' weights are views into `w13 [E+1, 2I, d]` (gate rows first,
then up) and `w2 [E+1, d, I]`, so the checkpoint names stay per expert while the GEMMs read one
stacked tensor.

A rank of a tensor/expert-parallel model (`restack`) stacks only its own routed experts (whole or
width-sliced); pairs routed elsewhere get weight 0 and are left out of the GEMMs, and the shared
expert (whose slice may differ in width) runs apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.kernels.moe.reference import route_ref, swiglu_ref

from ..config import HASH_MOE, ModelConfig
from .layers import Linear, empty_param


class Expert(nn.Module):
    """SwiGLU with clamped pre-activations: gate <= limit, |up| <= limit."""

    def __init__(self, dim: int, inter: int, limit: float, dtype: torch.dtype):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, dtype)  # gate
        self.w2 = Linear(inter, dim, dtype)  # down
        self.w3 = Linear(dim, inter, dtype)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu_ref(self.w1(x), self.w3(x), self.limit))

    def bind(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Make this expert's weights views of one row of the stacked tensors."""
        inter = self.w1.weight.shape[0]
        self.w1.weight = nn.Parameter(w13[:inter], requires_grad=False)
        self.w3.weight = nn.Parameter(w13[inter:], requires_grad=False)
        self.w2.weight = nn.Parameter(w2, requires_grad=False)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool, dtype: torch.dtype):
        super().__init__()
        self.hashed, self.topk, self.route_scale = hashed, cfg.experts_per_token, cfg.routed_scaling_factor
        self.weight = empty_param(cfg.num_experts, cfg.hidden_size, dtype=dtype)
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.experts_per_token, dtype=torch.long))
        else:
            self.bias = empty_param(cfg.num_experts, dtype=torch.float32)
        self._weight_f32: torch.Tensor | None = None
        self._weight_version = -1

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits `[N, E]` in float32 (the weight's float32 copy is kept while the weight is unchanged)."""
        if self.weight.dtype == torch.float32:
            w = self.weight
        else:
            if self._weight_f32 is None or self._weight_version != self.weight._version:
                self._weight_f32, self._weight_version = self.weight.float(), self.weight._version
            w = self._weight_f32
        return F.linear(x.float(), w)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [N, k] (float32) and expert ids [N, k] for tokens x [N, d]."""
        hash_ids = self.tid2eid[token_ids] if self.hashed else None
        return route_ref(self.logits(x), None if self.hashed else self.bias, hash_ids, self.topk, self.route_scale)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp_type: str, dtype: torch.dtype):
        super().__init__()
        self.gate = Gate(cfg, mlp_type == HASH_MOE, dtype)
        d, inter, shared_inter = cfg.hidden_size, cfg.moe_inter_size, cfg.moe_inter_size * cfg.num_shared_experts
        self.experts = nn.ModuleList(Expert(d, inter, cfg.swiglu_limit, dtype) for _ in range(cfg.num_experts))
        self.shared_experts = Expert(d, shared_inter, cfg.swiglu_limit, dtype)
        self.limit = cfg.swiglu_limit
        # the grouped path needs the shared expert to be one more group of the same width
        self.stacked = shared_inter == inter
        if self.stacked:
            groups = cfg.num_experts + 1
            device = self.gate.weight.device
            self.register_buffer("w13", torch.empty(groups, 2 * inter, d, dtype=dtype, device=device), persistent=False)
            self.register_buffer("w2", torch.empty(groups, d, inter, dtype=dtype, device=device), persistent=False)
            for e, expert in enumerate([*self.experts, self.shared_experts]):
                expert.bind(self.w13[e], self.w2[e])
        self.local: tuple[int, int] | None = None  # (first, count) of the stacked routed experts of a rank

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, grouped: bool = False) -> torch.Tensor:
        """The layer's output; `grouped`: on the device kernels (the kernel path), else the reference loop."""
        return self.grouped(x, token_ids) if grouped else self.loop(x, token_ids)

    def restack(self, first: int, count: int) -> None:
        """Stack routed experts first .. first+count-1 only (a rank's share, their weights as they are
        now) for the grouped path; the shared expert then runs apart."""
        experts = list(self.experts[first:first + count])
        inter, d = experts[0].w1.weight.shape
        like = experts[0].w1.weight
        w13 = torch.empty(count, 2 * inter, d, dtype=like.dtype, device=like.device)
        w2 = torch.empty(count, d, inter, dtype=like.dtype, device=like.device)
        for e, expert in enumerate(experts):
            w13[e, :inter].copy_(expert.w1.weight)
            w13[e, inter:].copy_(expert.w3.weight)
            w2[e].copy_(expert.w2.weight)
            expert.bind(w13[e], w2[e])
        self.register_buffer("w13", w13, persistent=False)
        self.register_buffer("w2", w2, persistent=False)
        self.stacked, self.local = True, (first, count)

    def loop(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x, token_ids)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            rows, slot = torch.where(idx == e)
            y = self.experts[e](x[rows]) * weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y.to(out.dtype))
        return out + self.shared_experts(x)

    def grouped(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Same function as `loop`, on the device kernels and grouped GEMMs (no host sync)."""
        from dsv4.kernels.moe.kernel import moe_align, moe_combine, moe_route, swiglu

        if not self.stacked:
            return self.loop(x, token_ids)
        gate = self.gate
        if gate.hashed:
            weights, ids = moe_route(gate.logits(x), gate.topk, gate.route_scale, tid2eid=gate.tid2eid, token_ids=token_ids)
        else:
            weights, ids = moe_route(gate.logits(x), gate.topk, gate.route_scale, bias=gate.bias)
        groups = self.w13.shape[0]
        if self.local is not None:  # pairs of other ranks' experts (and the shared one) sort last, weight 0
            first, count = self.local
            mine = (ids >= first) & (ids < first + count)
            ids = torch.where(mine, ids - first, count).to(torch.int32)
            weights = torch.where(mine, weights, 0.0)
            groups = count + 1
        rows, slots, offsets = moe_align(ids, groups)  # token-expert pairs grouped by expert
        offsets = offsets[:self.w13.shape[0]]  # rows past the last offset: not computed, combined with weight 0
        h = torch._grouped_mm(x.index_select(0, rows), self.w13.transpose(1, 2), offs=offsets)
        y = torch._grouped_mm(swiglu(h, self.limit), self.w2.transpose(1, 2), offs=offsets)
        out = moe_combine(y, slots, weights)
        return out if self.local is None else out + self.shared_experts(x)
