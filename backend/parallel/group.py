"""Who splits what: the tensor/expert-parallel shape of a run and its process group.

TP and EP share one set of ranks: the world is max(tp, ep) processes and each degree is either 1
or the whole world. Errors name the `dsv4-generate` option they come from, since that is where a
user chose the numbers.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelConfig

# NVLink multicast (NVLS) stays off in every process that joins a group
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class ParallelError(ValueError):
    """A tensor/expert-parallel degree that this model, device or the other degree does not allow."""


@dataclass(frozen=True)
class ParallelConfig:
    """Heads and expert widths split `tensor_parallel` ways; routed experts spread `expert_parallel` ways."""

    tensor_parallel: int = 1
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        degrees = (("--tensor-parallel", self.tensor_parallel), ("--expert-parallel", self.expert_parallel))
        for option, degree in degrees:
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ParallelError(f"{option} {degree!r}: must be a positive integer")
        if self.tensor_parallel not in (1, self.world_size) or self.expert_parallel not in (1, self.world_size):
            raise ParallelError(f"--tensor-parallel {self.tensor_parallel} --expert-parallel {self.expert_parallel}: "
                                "TP and EP share the same ranks, so each must be 1 or equal to the other")

    @property
    def world_size(self) -> int:
        return max(self.tensor_parallel, self.expert_parallel)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise `ParallelError` unless this model's heads, output groups and experts split evenly."""
        tp, ep = self.tensor_parallel, self.expert_parallel
        if tp > 1:
            if cfg.num_heads % tp:
                raise ParallelError(f"--tensor-parallel {tp}: the model's {cfg.num_heads} attention heads do not "
                                    f"split evenly over {tp} ranks")
            if cfg.o_groups % tp and tp % cfg.o_groups:
                raise ParallelError(f"--tensor-parallel {tp}: the model's {cfg.o_groups} output groups neither split "
                                    f"over {tp} ranks nor divide them")
            shared_inter = cfg.moe_inter_size * cfg.num_shared_experts
            # routed experts are split by TP only when EP does not spread them
            inters = (shared_inter,) if ep > 1 else (shared_inter, cfg.moe_inter_size)
            if any(width % tp for width in inters):
                raise ParallelError(f"--tensor-parallel {tp}: the experts' intermediate width {cfg.moe_inter_size} "
                                    f"(shared: {shared_inter}) does not split evenly over {tp} ranks")
        if ep > 1 and cfg.num_experts % ep:
            raise ParallelError(f"--expert-parallel {ep}: the model's {cfg.num_experts} routed experts do not "
                                f"spread evenly over {ep} ranks")

    def check_device(self, device: torch.device | str, visible_gpus: int | None = None) -> None:
        """On cuda every rank takes one GPU (rank r: GPU r, NCCL): refused where there are fewer."""
        if not self.enabled or torch.device(device).type == "cpu":
            return
        count = torch.cuda.device_count() if visible_gpus is None else visible_gpus
        if count < self.world_size:
            raise ParallelError(f"--tensor-parallel/--expert-parallel on {device} need one GPU per rank: "
                                f"{self.world_size} ranks, {count} GPU(s) visible (on CPU only, gloo, they need none)")


def turn_off_multicast() -> None:
    os.environ.update(MULTICAST_OFF)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_init_method(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def join_group(rank: int, world_size: int, init_method: str, device: torch.device | str = "cpu") -> dist.ProcessGroup:
    """Join the default process group: gloo for CPU tensors, nccl for CUDA ones (one GPU per rank)."""
    turn_off_multicast()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return dist.group.WORLD
