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
