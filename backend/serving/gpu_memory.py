"""KV pools sized from GPU memory measured after the warm-up, not from a fixed byte count.

Prefill and decode are separate processes that load at the same time on one GPU, so neither can
read "what is free" and take it: each gets a fixed share of the device (`fraction` of its total
memory) and fills that share with its own footprint, measured by its own allocator (weights, then
the peak of a warm-up that runs the largest shapes serving will run: prefill's biggest pass, decode's
CUDA graphs at every batch bucket), and KV pages for the rest. What the allocator cannot see (the
CUDA contexts, Triton's handoff pool, the other stubs) lives in the part of the GPU no share claims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30
# allocator fragmentation and transient tensors not seen in the warm-up (handoff payloads in flight)
SLACK_BYTES = 512 << 20


@dataclass(frozen=True)
class MemorySplit:
    """One stage's part of the GPU, in bytes."""

    stage: str
    device_bytes: int  # the GPU's total memory
    share_bytes: int  # what this stage may fill
    weights_bytes: int
    working_bytes: int  # warm-up peak beyond weights and the probe pool: activations, graph pool, workspaces
    kv_bytes: int
    prefix_kv_bytes: int = 0  # of kv_bytes, prefill's pool when both stages share one process

    def shared_with_prefill(self, prefill_working_bytes: int, prefill_kv_share: float) -> MemorySplit:
        """Decode's split made room for prefill in the same process: one copy of the weights, prefill's
        warm-up peak on top of decode's (both run at once), and `prefill_kv_share` of the KV for prefill."""
        kv = self.kv_bytes - prefill_working_bytes
        if kv <= 0:
            raise MemoryError(f"no GPU memory left for the KV pools once prefill's warm-up peak "
                              f"{prefill_working_bytes / GIB:.2f} GiB is paid; raise --gpu-memory-utilization, "
                              "or lower --prefill-chunk / --prefill-token-budget")
        return MemorySplit("prefill+decode", self.device_bytes, self.share_bytes, self.weights_bytes,
                           self.working_bytes + prefill_working_bytes, kv, int(kv * prefill_kv_share))

    def describe(self) -> str:
        def g(n: int) -> str:
            return f"{n / GIB:.2f} GiB"

        prefix = f" (prefix cache {g(self.prefix_kv_bytes)})" if self.prefix_kv_bytes else ""
        return (f"{self.stage}: {g(self.share_bytes)} of the GPU's {g(self.device_bytes)} = weights {g(self.weights_bytes)}"
                f" + working {g(self.working_bytes)} + KV pool {g(self.kv_bytes)}{prefix} + slack {g(SLACK_BYTES)}")

    def parts(self) -> dict[str, int]:
        """Values of the `dsv4_gpu_memory_bytes` gauge by `part` label."""
        parts = {"share": self.share_bytes, "weights": self.weights_bytes, "working": self.working_bytes,
                 "kv": self.kv_bytes}
        return parts | ({"kv_prefix": self.prefix_kv_bytes} if self.prefix_kv_bytes else {})


def warm_up_peak(device: torch.device, weights_bytes: int) -> int:
    """Bytes the warm-up reserved beyond the weights; the cache is emptied for the next measurement."""
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device) - weights_bytes
    torch.cuda.empty_cache()
    return max(0, peak)


def start_measuring(device: torch.device) -> int:
    """Call once the weights are loaded: returns their bytes and starts the warm-up's peak."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def split_after_warm_up(stage: str, device: torch.device, fraction: float, weights_bytes: int,
                        probe_bytes: int = 0) -> MemorySplit:
    """The KV budget left in `fraction` of the device once the measured footprint is paid.

    `probe_bytes` is the throwaway pool the warm-up ran on (freed before the real one is made).
    Raises MemoryError naming the flags when nothing is left for KV.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"GPU memory fraction {fraction} for {stage}: must be in (0, 1]")
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device)
    total = torch.cuda.get_device_properties(device).total_memory
    share = int(total * fraction)
    working = max(0, peak - weights_bytes - probe_bytes)
    kv = share - weights_bytes - working - SLACK_BYTES
    # the other stage or another process may already hold more than its share: never ask for what is not there
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    kv = min(kv, free - SLACK_BYTES)
    if kv <= 0:
        raise MemoryError(f"{stage}: no GPU memory left for the KV pool: share {share / GIB:.2f} GiB, weights "
                          f"{weights_bytes / GIB:.2f} GiB, warm-up peak {working / GIB:.2f} GiB, free {free / GIB:.2f} GiB; "
                          "raise --gpu-memory-utilization, or lower --max-batch / --prefill-chunk")
    return MemorySplit(stage, total, share, weights_bytes, working, kv)
