"""Small stateless math shared by the V4 modules: YaRN frequencies here; norms and RoPE from the
kernels' float32 references (one definition for the model and the kernel tests)."""

from __future__ import annotations

import math

import torch

from dsv4.kernels.norm_rope.reference import apply_rope, head_rms_norm, rms_norm, rope_cos_sin

from ..config import ModelConfig

__all__ = ["apply_rope", "head_rms_norm", "rms_norm", "rope_cos_sin", "layer_inv_freq", "yarn_inv_freq", "default_inv_freq"]


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
