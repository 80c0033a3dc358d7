"""Block tables and positions reach the GPU without waiting for it: `to_device` queues its copy
behind a long kernel and returns at once, where a copy from pageable memory waits for the kernel
(the behaviour that stalled loops running ahead of the GPU); the values arrive intact."""

from __future__ import annotations

import time

import torch

from dsv4.kernels.host_copy import to_device

SLEEP_CYCLES = 200_000_000  # about 0.1 s of one SM spinning


def _host_seconds(copy) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the stream is busy for a while
    start = time.perf_counter()
    out = copy()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds, out


def test_to_device_does_not_wait_for_the_stream():
    values = list(range(7, 7 + 300))
    pageable, expected = _host_seconds(lambda: torch.tensor(values, dtype=torch.int32, device="cuda"))
    queued, out = _host_seconds(lambda: to_device(values, torch.int32, "cuda"))
    assert torch.equal(out.cpu(), expected.cpu()) and out.dtype == torch.int32
    assert pageable > 0.05, f"the pageable copy did not wait for the kernel ({pageable:.3f} s): the test shows nothing"
    assert queued < pageable / 10, f"to_device waited {queued:.3f} s (pageable {pageable:.3f} s)"
    # the pinned buffer is not reused before its copy ran: many copies in flight behind one kernel
    torch.cuda._sleep(SLEEP_CYCLES)
    outs = [to_device([i] * 64, torch.int64, "cuda") for i in range(200)]
    torch.cuda.synchronize()
    assert all(bool((o == i).all()) for i, o in enumerate(outs))
