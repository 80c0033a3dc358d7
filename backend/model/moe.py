"""Mixture of experts: hash routing (first layers) or sqrt-softplus scores with a selection bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool, dtype: torch.dtype):
        super().__init__()
        self.hashed, self.topk, self.route_scale = hashed, cfg.experts_per_token, cfg.routed_scaling_factor
        self.weight = empty_param(cfg.num_experts, cfg.hidden_size, dtype=dtype)
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.experts_per_token, dtype=torch.long))
        else:
            self.bias = empty_param(cfg.num_experts, dtype=torch.float32)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [N, k] (float32) and expert ids [N, k] for tokens x [N, d]."""
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()
        if self.hashed:
            idx = self.tid2eid[token_ids]
        else:
            # the bias balances load: it changes which experts are picked, never their weights
            idx = torch.topk(scores + self.bias, self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale, idx


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp_type: str, dtype: torch.dtype):
        super().__init__()
        self.gate = Gate(cfg, mlp_type == HASH_MOE, dtype)
        self.experts = nn.ModuleList(
            Expert(cfg.hidden_size, cfg.moe_inter_size, cfg.swiglu_limit, dtype) for _ in range(cfg.num_experts)
        )
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_inter_size * cfg.num_shared_experts, cfg.swiglu_limit, dtype)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x, token_ids)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            rows, slot = torch.where(idx == e)
            y = self.experts[e](x[rows]) * weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y.to(out.dtype))
        return out + self.shared_experts(x)
