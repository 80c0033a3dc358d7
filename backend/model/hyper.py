"""Manifold-constrained hyper-connections (mHC): n_hc residual streams mixed around each sub-layer.

The math is `dsv4.kernels.mhc.reference` (shared with the kernel tests); this module binds it to
the model config. The kernel path runs the same steps fused (`dsv4.kernels.mhc.kernel`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsv4.kernels.mhc.reference import (hc_collapse_ref, hc_expand_ref, hc_weights_ref, head_weights_ref,
                                        stream_mixes)

from ..config import ModelConfig


class HCWeights(NamedTuple):
    pre: torch.Tensor  # [N, n] collapse weights
    post: torch.Tensor  # [N, n] expand weights, in (0, 2)
    comb: torch.Tensor  # [N, n, n] doubly stochastic residual mixing


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig) -> HCWeights:
    """streams [N, n, d] -> pre/post/comb, in float32 (Sinkhorn projection onto doubly stochastic)."""
    mixes = stream_mixes(streams, fn, cfg.rms_norm_eps)
    return HCWeights(*hc_weights_ref(mixes, base, scale, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps))


def hc_collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return hc_collapse_ref(streams, pre)


def hc_expand(streams: torch.Tensor, out: torch.Tensor, w: HCWeights) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j  (comb applied transposed)."""
    return hc_expand_ref(streams, out, w.post, w.comb)


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Final collapse of the streams before the output norm: sigmoid weights, no mixing."""
    pre = head_weights_ref(stream_mixes(streams, fn, cfg.rms_norm_eps), base, scale, cfg.hc_eps)
    return hc_collapse(streams, pre)
