"""One prefill pass over chunks that continue earlier ones, on the kernel path (batched) or the reference
path (prompt by prompt): the CPU and GPU tests of the batched pass compare the two."""

from __future__ import annotations

import torch

from dsv4.backend.kv_cache.paged_cache import PagedCache


def continued_pass(model, prompts: list[torch.Tensor], firsts: list[int], kernels: bool, max_len: int,
                   next_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's first `firsts[i]` tokens alone, then the rest of every prompt in one pass (`kernels`)
    or one by one (reference); returns the pass's last logits and those of one decode step after it
    (float pages, on the model's device)."""
    cache = PagedCache.for_requests(model.cfg, model.dtype, model.device, len(prompts), max_len, kv_format="float")
    cache.storage.use_kernels = kernels
    seqs = [cache.admit(str(i), max_len) for i in range(len(prompts))]
    for p, s, a in zip(prompts, seqs, firsts):
        if a:
            model.prefill(p[:a], s, cache.storage)
    chunks = [(p[a:], s) for p, s, a in zip(prompts, seqs, firsts)]
    logits = model.prefill_batch(chunks, cache.storage) if kernels else \
        torch.cat([model.prefill(t, s, cache.storage) for t, s in chunks])
    return logits, model.decode(torch.tensor(next_tokens, device=model.device), seqs, cache.storage)
