"""Manifold-constrained hyper-connections (mHC), float32 reference: the model's reference path.

n residual streams `[N, n, d]` are mixed around each sub-layer. From the RMS-normalised flattened
streams a linear map gives `2n + n^2` mixing logits: `pre` (collapse weights, sigmoid), `post`
(expand weights, 2 sigmoid) and `comb` (softmax rows, then Sinkhorn iterations towards a doubly
stochastic matrix, applied transposed). The head uses `pre` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def stream_mixes(streams: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    """Mixing logits `[N, M]` (float32) of streams `[N, n, d]` through `fn [M, n*d]`."""
    flat = streams.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn.float())


def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Row softmax of `[..., n, n]` logits, then alternate column / row normalisation."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_weights_ref(mixes: Tensor, base: Tensor, scale: Tensor, n: int, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(pre [N, n], post [N, n], comb [N, n, n]) in float32 from mixing logits `[N, 2n + n^2]`."""
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = sinkhorn(comb_w.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), iters, eps)
    return pre, post, comb


def head_weights_ref(mixes: Tensor, base: Tensor, scale: Tensor, eps: float) -> Tensor:
    """The head's collapse weights `[N, n]`: sigmoid, no mixing."""
    return torch.sigmoid(mixes * scale.float() + base.float()) + eps


def hc_collapse_ref(streams: Tensor, pre: Tensor) -> Tensor:
    """sum_k pre_k X_k, in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


def hc_expand_ref(streams: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j, in the streams' dtype (comb applied transposed)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
