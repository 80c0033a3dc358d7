"""Small host lists (block tables, positions, scalars) to device tensors without waiting for the device.

Torch only (no Triton): the model and serving code import it on machines without Triton too.

A copy from pageable host memory to a GPU first waits for everything already queued on the stream
(CUDA's rule for pageable transfers), so one `torch.tensor(list, device="cuda")` in a loop that runs
ahead of the GPU (decode one step ahead, prefill launching layer after layer) stalls it until the GPU
has caught up. From pinned memory the copy is queued like a kernel; PyTorch's pinned-memory cache
keeps the host buffer until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[int | float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (a list or a numpy array) as a tensor of `dtype` on `device`; on a GPU, queued on the current stream."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
