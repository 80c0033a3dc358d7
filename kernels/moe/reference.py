"""MoE routing and the clamped SwiGLU, float32 reference (the model's reference path uses these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def route_ref(logits: Tensor, bias: Tensor | None, hash_ids: Tensor | None, topk: int,
              route_scale: float) -> tuple[Tensor, Tensor]:
    """Routing weights `[N, k]` (float32) and expert ids `[N, k]` from gate logits `[N, E]` (float32).

    Scores are sqrt(softplus(logits)). Hash layers take their ids from the token's table row; the
    others pick the top k of scores + bias (the bias balances load: it changes which experts are
    picked, never their weights). Weights are the picked scores, normalised, times route_scale.
    """
    scores = F.softplus(logits.float()).sqrt()
    if hash_ids is not None:
        idx = hash_ids.long()
    else:
        idx = torch.topk(scores + bias, topk, dim=-1, sorted=False).indices
    w = scores.gather(1, idx)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * route_scale, idx


def swiglu_ref(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit), in the inputs' dtype."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def combine_ref(y: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """out[t] = sum_j weights[t, j] * y[slots[t, j]] in float32 `[N, d]`; a pair of weight 0 adds
    nothing whatever its row of y holds (a rank's rows for other ranks' experts are never computed)."""
    picked = y.float()[slots]
    return torch.where(weights[..., None] != 0, picked * weights[..., None], 0.0).sum(1)
