"""The GPU share arithmetic with the CUDA allocator's readings replaced by fixed numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsv4.backend.serving import gpu_memory
from dsv4.backend.serving.gpu_memory import GIB, SLACK_BYTES


@pytest.fixture
def fake_gpu(monkeypatch):
    state = {"total": 100 * GIB, "peak": 0, "free": 100 * GIB}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=state["total"]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    return state


def test_kv_gets_the_share_left_after_weights_and_the_warm_up_peak(fake_gpu):
    fake_gpu["peak"] = 10 * GIB + 3 * GIB + 1 * GIB  # weights + working + the probe pool
    split = gpu_memory.split_after_warm_up("decode", "cuda", 0.5, weights_bytes=10 * GIB, probe_bytes=1 * GIB)
    assert split.share_bytes == 50 * GIB and split.working_bytes == 3 * GIB
    assert split.kv_bytes == 50 * GIB - 13 * GIB - SLACK_BYTES
    assert split.parts() == {"share": 50 * GIB, "weights": 10 * GIB, "working": 3 * GIB, "kv": split.kv_bytes}
    assert "decode: 50.00 GiB" in split.describe()


def test_kv_never_exceeds_what_is_free(fake_gpu):
    fake_gpu["peak"], fake_gpu["free"] = 12 * GIB, 5 * GIB  # another process holds more than its share
    split = gpu_memory.split_after_warm_up("prefill", "cuda", 0.5, weights_bytes=10 * GIB)
    assert split.kv_bytes == 5 * GIB - SLACK_BYTES


def test_no_room_names_the_flags(fake_gpu):
    fake_gpu["peak"] = 60 * GIB
    with pytest.raises(MemoryError, match="--gpu-memory-utilization"):
        gpu_memory.split_after_warm_up("decode", "cuda", 0.5, weights_bytes=10 * GIB)
    with pytest.raises(ValueError, match="fraction"):
        gpu_memory.split_after_warm_up("decode", "cuda", 1.5, weights_bytes=10 * GIB)
