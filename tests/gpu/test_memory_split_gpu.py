"""Decode's KV budget from measured GPU memory: the throwaway warm-up is freed, and the real pool plus
the graphs captured on it stay inside the share the split promised."""

from __future__ import annotations

import torch

from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.decode_engine import measure_decode_memory
from dsv4.backend.serving.gpu_memory import SLACK_BYTES
from dsv4.backend.decode_runner import DecodeRunner


def test_decode_pool_and_graphs_fit_the_measured_share(gpu_models):
    model = gpu_models[torch.bfloat16]
    device = model.device
    others = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the other fixtures' cache
    fraction = (torch.cuda.memory_reserved(device) + (8 << 30)) / torch.cuda.get_device_properties(device).total_memory
    split = measure_decode_memory(model, "fp8", 32, 65536, fraction)
    print(f"\n{split.describe()}")
    assert split.weights_bytes > 0 and split.working_bytes > 0 and split.kv_bytes > 0
    before = torch.cuda.memory_reserved(device)
    assert before <= split.weights_bytes + others + SLACK_BYTES, "the probe pool and its graphs were not freed"
    torch.cuda.reset_peak_memory_stats(device)
    cache = PagedCache.from_budget(model.cfg, model.dtype, device, split.kv_bytes, 65536, max_num_seqs=32, kv_format="fp8")
    assert cache.storage.nbytes() <= split.kv_bytes
    DecodeRunner(model, cache.storage, 32, 65536, frozenset(model.cfg.eos_token_ids)).capture()
    peak = torch.cuda.max_memory_reserved(device)
    print(f"reserved after the real pool and graphs: {peak / 2**30:.2f} GiB of a {split.share_bytes / 2**30:.2f} GiB share")
    assert peak <= split.share_bytes + others
