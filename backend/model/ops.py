"""Small stateless math shared by the V4 modules: norms, interleaved partial RoPE, YaRN frequencies."""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float32; the (float32) weight multiplies before the single cast back, as the release does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = weight.float() * xf
    return xf.to(x.dtype)


def head_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted per-head RMS normalisation of queries (keeps logits bounded)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def default_inv_freq(rope_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))


def yarn_inv_freq(rope_dim: int, theta: float, factor: float, original_max: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN-interpolated frequencies; V4 applies no cos/sin mscale, so only the frequencies change."""

    def correction_dim(rotations: float) -> float:
        return (rope_dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def layer_inv_freq(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """SWA layers: plain RoPE at rope_theta. CSA/HCA layers: compress_rope_theta with YaRN."""
    if not compressed:
        return default_inv_freq(cfg.rope_dim, cfg.rope_theta)
    if cfg.yarn is None:
        return default_inv_freq(cfg.rope_dim, cfg.compress_rope_theta)
    y = cfg.yarn
    return yarn_inv_freq(cfg.rope_dim, cfg.compress_rope_theta, y.factor, y.original_max_position, y.beta_fast, y.beta_slow)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., rope_dim/2] in float32 for integer positions of any shape."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
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
