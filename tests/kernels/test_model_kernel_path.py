"""The model on the fused kernels (the CUDA path) equals the PyTorch reference path: prefill in
uneven chunks, then batched decode of requests at different positions. On a CPU the kernels run
under the Triton interpreter."""

from __future__ import annotations

import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.paged_cache import PagedCache

from tests.model.oracle import CONFIG_KERNELS, build_hf, rel_err, save_hf


def _run(model, use_kernels: bool, prompts: list[torch.Tensor], chunks: list[int], steps: int) -> torch.Tensor:
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(prompts), 128)
    cache.storage.use_kernels = use_kernels
    seqs, outs = [], []
    for i, prompt in enumerate(prompts):
        seq = cache.admit(str(i), 128)
        pos = 0
        for n in chunks[i]:
            outs.append(model.prefill(prompt[pos : pos + n], seq, cache.storage, all_logits=True))
            pos += n
        seqs.append(seq)
    for k in range(steps):
        tokens = torch.stack([p[sum(c) + k] for p, c in zip(prompts, chunks)])
        outs.append(model.decode(tokens, seqs, cache.storage))
    return torch.cat(outs)


def test_kernel_path_equals_reference_path(tmp_path):
    model = load_model(save_hf(build_hf(CONFIG_KERNELS, seed=2), tmp_path / "m"), progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (40,), generator=g) for _ in range(2)]
    # neither a multiple of the window, of 4 or of the HCA rate 16; the decode steps run past the
    # window, the CSA top-k (3 of 5 blocks) and the first HCA block (the interpreter is slow)
    chunks = [[11, 9], [5, 14]]
    reference = _run(model, False, prompts, chunks, steps=3)
    kernels = _run(model, True, prompts, chunks, steps=3)
    assert torch.isfinite(kernels).all()
    assert rel_err(kernels, reference) < 1e-4
