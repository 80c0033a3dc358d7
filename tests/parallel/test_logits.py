"""TP, EP and both on 2 and 4 gloo ranks give the one-process logits (prefill, a second chunk,
batched decode), and every rank the same ones (each samples on its own, so they must agree exactly).

The tiny preset splits 4 ways as it is: 4 heads (one per rank, half of one of its 2 output groups),
8 experts (two per rank), expert widths of 128.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.parallel.group import ParallelConfig
from dsv4.backend.parallel.launch import spawn_ranks

from .workload import one_thread, run_kernel_workload, run_parallel, run_parallel_kernels, run_workload

TOLERANCE = 1e-5  # float32: the ranks' partial sums add in another order than one process's
TWO_RANKS = [ParallelConfig(2, 1), ParallelConfig(1, 2), ParallelConfig(2, 2)]
FOUR_RANKS = [ParallelConfig(4, 4), ParallelConfig(4, 1), ParallelConfig(1, 4)]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    with one_thread():
        return run_workload(load_model(tiny_dir, progress=False))


@pytest.fixture(scope="module")
def runs(tiny_dir):
    """Every config's logits per rank; one spawn per world size serves all its configs."""
    cache: dict[int, dict[ParallelConfig, list]] = {}

    def get(parallel: ParallelConfig) -> list[dict[str, torch.Tensor]]:
        world = parallel.world_size
        if world not in cache:
            configs = TWO_RANKS if world == 2 else FOUR_RANKS
            per_rank = spawn_ranks(run_parallel, world, str(tiny_dir), configs, threads=1)
            cache[world] = {c: [ranks[i] for ranks in per_rank] for i, c in enumerate(configs)}
        return cache[world][parallel]

    return get


@pytest.mark.parametrize("parallel", TWO_RANKS + FOUR_RANKS,
                         ids=lambda p: f"tp{p.tensor_parallel}-ep{p.expert_parallel}")
def test_parallel_logits_equal_one_process(parallel, reference, runs):
    ranks = runs(parallel)
    for name, expected in reference.items():
        diff = (ranks[0][name] - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: largest logit difference {diff:.3g}"
        for rank, result in enumerate(ranks):
            assert torch.equal(result[name], ranks[0][name]), f"{name}: rank {rank} differs from rank 0"


def test_kernel_path_on_two_ranks_equals_one_process(tiny_dir):
    """The shards' fused weights (the q-latent projection fused again, the rank's experts stacked) and
    the all-reduces on the kernel path: TP and EP at once on 2 ranks."""
    with one_thread():
        expected = run_kernel_workload(load_model(tiny_dir, progress=False))
    ranks = spawn_ranks(run_parallel_kernels, 2, str(tiny_dir), ParallelConfig(2, 2), threads=1)
    for name, logits in expected.items():
        assert torch.isfinite(ranks[0][name]).all(), name
        diff = (ranks[0][name] - logits).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: largest logit difference {diff:.3g}"
        assert torch.equal(ranks[1][name], ranks[0][name]), f"{name}: rank 1 differs from rank 0"
