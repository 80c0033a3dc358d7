"""Manifold-constrained hyper-connections (mHC): n_hc residual streams mixed around each sub-layer."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import ModelConfig


class HCWeights(NamedTuple):
    pre: torch.Tensor  # [N, n] collapse weights
    post: torch.Tensor  # [N, n] expand weights, in (0, 2)
    comb: torch.Tensor  # [N, n, n] doubly stochastic residual mixing


def _stream_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    flat = streams.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return F.linear(flat, fn.float())


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig) -> HCWeights:
    """streams [N, n, d] -> pre/post/comb, in float32 (Sinkhorn projection onto doubly stochastic)."""
    n, eps = cfg.hc_mult, cfg.hc_eps
    mixes = _stream_mixes(streams, fn, cfg.rms_norm_eps)
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return HCWeights(pre, post, comb)


def hc_collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


def hc_expand(streams: torch.Tensor, out: torch.Tensor, w: HCWeights) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j  (comb applied transposed)."""
    dtype = streams.dtype
    return w.post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(w.comb.to(dtype).transpose(-1, -2), streams)


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Final collapse of the streams before the output norm: sigmoid weights, no mixing."""
    mixes = _stream_mixes(streams, fn, cfg.rms_norm_eps)
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + cfg.hc_eps
    return hc_collapse(streams, pre)
