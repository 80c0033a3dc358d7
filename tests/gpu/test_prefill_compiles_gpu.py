"""After the prefill warm-up, prompts of other lengths must not compile new kernel variants: every
variant is seconds of a served request's TTFT (found through Triton's trace: a first 8K prompt spent
6.4 s in prefill, the same length again 0.14 s). Prints which kernels compiled what."""

from __future__ import annotations

import importlib
import time

import torch
import triton

from dsv4.backend.generate import eos_ids_tensor
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.prefill_stage import warm_up_passes

KERNEL_MODULES = ("compressor", "indexer_topk", "kv_format", "mhc", "moe", "norm_rope", "sparse_decode", "sparse_prefill", "sampling")
CHUNK = 8192


def _jit_functions() -> dict[str, object]:
    out = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"dsv4.kernels.{name}.kernel")
        for attr, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                out[f"{name}.{attr}"] = obj
    return out


def _variants(fns) -> dict[str, set]:
    out = {}
    for name, fn in fns.items():
        keys = set()
        for entry in getattr(fn, "device_caches", {}).values():
            keys |= set(entry[0].keys())
        out[name] = keys
    return out


def _prefill(model, lengths: list[int], seed: int) -> None:
    """The served stage's passes: each prompt in chunks of CHUNK, prompts of one pass together."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cuda", len(lengths), max(lengths) + 1, kv_format="fp8")
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).cuda() for n in lengths]
    seqs = [cache.admit(str(i), n + 1) for i, n in enumerate(lengths)]
    done = [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):
        live = [i for i, n in enumerate(lengths) if done[i] < n]
        model.prefill_batch([(prompts[i][done[i]:min(done[i] + CHUNK, lengths[i])], seqs[i]) for i in live], cache.storage)
        for i in live:
            done[i] = min(done[i] + CHUNK, lengths[i])
    torch.cuda.synchronize()


def test_no_new_kernel_variants_after_warm_up(gpu_models):
    model = gpu_models[torch.bfloat16]
    fns = _jit_functions()
    warm_up_passes(model, CHUNK, 2, "fp8", eos_ids_tensor(model.cfg.eos_token_ids, model.device))  # the served stage's
    seen = _variants(fns)
    compiled = {}
    for k, lengths in enumerate(([CHUNK + 1], [16], [3], [100], [2048] * 8, [5000, 77], [32768], [CHUNK * 3 + 5])):
        start = time.perf_counter()
        _prefill(model, lengths, k + 1)
        now = _variants(fns)
        new = {name: len(now[name] - seen[name]) for name in fns if now[name] - seen[name]}
        print(f"\nprompts {lengths[:3]}{'...' if len(lengths) > 3 else ''}: {time.perf_counter() - start:.2f} s, "
              f"new variants {new or 'none'}")
        for name in new:
            for key in sorted(map(str, now[name] - seen[name]))[:2]:
                print(f"    {name}: {key[:400]}")
        compiled.update(new)
        seen = now
    assert not compiled, f"kernels compiled after the warm-up: {compiled}"
