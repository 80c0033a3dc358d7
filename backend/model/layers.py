"""Parameter containers with the release's names; allocated uninitialised (weights come from a checkpoint)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T with W [out, in]; no bias anywhere in V4."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class RMSNormWeight(nn.Module):
    """Holds a norm's float32 weight; the math is `ops.rms_norm`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = empty_param(dim, dtype=torch.float32)


def fuse_linears(linears: list[Linear], keep_values: bool = False) -> torch.Tensor:
    """One `[sum out, in]` weight whose row blocks ARE the given linears' weights (views, no copy).

    The checkpoint loader fills the views in place, so the per-module names stay the checkpoint's
    while the kernel path runs one GEMM for every projection that shares an input. `keep_values`
    copies the weights' current values in (fusing again after a weight was replaced, e.g. sharded).
    """
    fused = torch.empty(sum(m.weight.shape[0] for m in linears), linears[0].weight.shape[1], dtype=linears[0].weight.dtype,
                        device=linears[0].weight.device)
    row = 0
    for m in linears:
        out = m.weight.shape[0]
        assert m.weight.shape[1] == fused.shape[1] and m.weight.dtype == fused.dtype, "fused linears share in-dim and dtype"
        if keep_values:
            fused[row:row + out].copy_(m.weight)
        m.weight = nn.Parameter(fused[row:row + out], requires_grad=False)
        row += out
    return fused
