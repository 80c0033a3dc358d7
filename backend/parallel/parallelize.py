"""Make this process's full model its rank's part of a tensor/expert-parallel group."""

from __future__ import annotations

import torch.distributed as dist

from ..model.transformer import Transformer
from .group import ParallelConfig, ParallelError
from .modules import install_reductions
from .shard import shard_model


def parallelize(model: Transformer, parallel: ParallelConfig, group: dist.ProcessGroup) -> Transformer:
    """Shard the weights in place for `group.rank()` and hook in the all-reduces; returns the model.

    Every rank must then make the same calls (prefill, prefill_batch, decode, decode_batch) with the
    same inputs: each layer's all-reduce waits for all of them.
    """
    if group.size() != parallel.world_size:
        raise ParallelError(f"a group of {group.size()} ranks cannot run --tensor-parallel {parallel.tensor_parallel} "
                            f"--expert-parallel {parallel.expert_parallel} ({parallel.world_size} ranks)")
    shard_model(model, parallel, group.rank())
    install_reductions(model, parallel, group)
    return model
