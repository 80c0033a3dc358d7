"""Norms and interleaved partial RoPE, float32 reference (the model's reference path uses these)."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm in float32; the (float32) weight multiplies before the single cast back, as the release does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = weight.float() * xf
    return xf.to(x.dtype)


def head_rms_norm(x: Tensor, eps: float) -> Tensor:
    """Unweighted per-head RMS normalisation of queries (keeps logits bounded)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin [..., rope_dim/2] in float32 for integer positions of any shape."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the trailing rope dims of `x` in interleaved pairs (2i, 2i+1).

    x: [..., D]; cos/sin: broadcastable to [..., rope_dim/2] (insert head axes before calling).
    `inverse` rotates by the conjugate angle (used on the attention output, since V carries RoPE).
    """
    half = cos.shape[-1]
    rope_dim = 2 * half
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    pairs = rope.float().unflatten(-1, (half, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat([nope, out.to(x.dtype)], dim=-1)
