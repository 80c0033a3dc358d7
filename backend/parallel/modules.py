"""The two points where a sharded model talks to the other ranks, and the stand-in for experts it lacks.

Each rank's attention output projection (`wo_b`, TP) and MoE output (TP or EP) is its share of the
full layer's output: a forward hook sums the shares over the group in place, so every rank goes on
with the full output and the blocks' own forward code runs unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..model.transformer import Transformer
from .group import ParallelConfig


class AbsentExpert(nn.Module):
    """A routed expert another rank holds (or EP's shared expert off rank 0): its share arrives
    through the MoE output's all-reduce, so here it adds nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def sum_output_over(module: nn.Module, group: dist.ProcessGroup) -> RemovableHandle:
    """After every call, replace `module`'s output by its sum over the group's ranks."""

    def all_reduce(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return module.register_forward_hook(all_reduce)


def install_reductions(model: Transformer, parallel: ParallelConfig, group: dist.ProcessGroup) -> list[RemovableHandle]:
    """One all-reduce after each attention's output projection (TP) and each MoE (TP or EP)."""
    handles = []
    for block in [*model.layers, *model.mtp]:
        if parallel.tensor_parallel > 1:
            handles.append(sum_output_over(block.attn.wo_b, group))
        if parallel.enabled:
            handles.append(sum_output_over(block.ffn, group))
    return handles
