"""CUDA streams for prefill and decode sharing one process and one GPU.

Two processes on one GPU time-slice it (each context gets the whole device in turns), so a
prefill pass beside a running decode ran 2-5x slower and decode's steps waited for it. In one
process the two run on streams of different priority and share the SMs: decode's short steps are
scheduled ahead of prefill's blocks as SMs free up, and prefill fills whatever decode leaves idle.
"""

from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple

import torch

# the GIL is handed between threads at this interval when both want it: decode's step is a few
# hundred microseconds of host work and must not wait the default 5 ms behind prefill's launches
SWITCH_INTERVAL_S = 0.0002


class StagePair(NamedTuple):
    decode: torch.cuda.Stream | None
    prefill: torch.cuda.Stream | None


def stage_streams(device: torch.device) -> StagePair:
    """Decode's stream at the highest priority, prefill's at the lowest (None off a GPU)."""
    if device.type != "cuda":
        return StagePair(None, None)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # lower numbers run first; out-of-range ones are clamped to the device's range (0 is its lowest)
    return StagePair(torch.cuda.Stream(device, priority=-100), torch.cuda.Stream(device, priority=0))


def on_stream(stream: torch.cuda.Stream | None):
    """The stream a thread's work is queued on (a no-op for None: the device's current stream)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
