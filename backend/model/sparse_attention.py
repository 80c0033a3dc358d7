"""Reference (PyTorch) attention over a window plus compressed entries, and the indexer's top-k.

One shared K=V head: every key is also its value. The per-head sink is an extra logit in the
softmax denominator with no value. These functions are the float32 ground truth the fused
kernels are tested against, and the CPU execution path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NEG_INF = float("-inf")


class KeyGroup(NamedTuple):
    """Keys shared by all queries ([K, D]) or per query ([N, K, D]), with visibility [N, K]."""

    keys: torch.Tensor
    visible: torch.Tensor


def attend(q: torch.Tensor, groups: list[KeyGroup], sink: torch.Tensor, scale: float) -> torch.Tensor:
    """q [N, H, D] -> [N, H, D]: one softmax over all groups' visible keys plus the sink logit."""
    logits = []
    for g in groups:
        if g.keys.dim() == 2:
            s = torch.einsum("nhd,kd->nhk", q, g.keys)
        else:
            s = torch.einsum("nhd,nkd->nhk", q, g.keys)
        logits.append((s * scale).masked_fill(~g.visible.unsqueeze(1), NEG_INF))
    sinks = sink.to(q.dtype).view(1, -1, 1).expand(q.shape[0], -1, 1)
    combined = torch.cat([*logits, sinks], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1)
    out = torch.zeros_like(q)
    offset = 0
    for g in groups:
        p = probs[..., offset:offset + g.keys.shape[-2]]
        offset += g.keys.shape[-2]
        if g.keys.dim() == 2:
            out = out + torch.einsum("nhk,kd->nhd", p, g.keys)
        else:
            out = out + torch.einsum("nhk,nkd->nhd", p, g.keys)
    return out


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Lightning-Indexer scores sum_h w_h * relu(q_h . k) / sqrt(head_dim).

    q [N, n_I, c_I], weights [N, n_I] (already scaled by n_I^-1/2), keys [K, c_I] shared or
    [N, K, c_I] per query -> [N, K] float32.
    """
    if keys.dim() == 2:
        s = torch.einsum("nhc,kc->nhk", q.float(), keys.float())
    else:
        s = torch.einsum("nhc,nkc->nhk", q.float(), keys.float())
    s = torch.relu(s) * head_dim**-0.5
    return (s * weights.float().unsqueeze(-1)).sum(dim=1)


def select_topk(scores: torch.Tensor, num_visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-min(k, K) entries per row among the first `num_visible` ones; unfillable picks are -1.

    Equal scores (common: ReLU zeroes whole rows of head products) go to the lower entry index,
    so the choice never depends on how many queries or requests share the call.
    scores [N, K]; num_visible [N] -> indices [N, min(k, K)] int64.
    """
    total = scores.shape[-1]
    take = min(k, total)
    if take == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    entry = torch.arange(total, device=scores.device)
    future = entry.view(1, -1) >= num_visible.view(-1, 1)
    picks = scores.masked_fill(future, NEG_INF).sort(dim=-1, descending=True, stable=True).indices[:, :take]
    return torch.where(picks >= num_visible.view(-1, 1), torch.full_like(picks, -1), picks)
