"""Batched prefill on the H200: several prompts in one pass (bf16 kernel path) compute what each
computes alone, to the bound that the pass's other GEMM shapes allow; in float32 the pass equals the
reference path; a pass queues everything without waiting for the GPU."""

from __future__ import annotations

import torch

from dsv4.backend.kv_cache.paged_cache import PagedCache
from tests.model.continued_pass import continued_pass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_prefill_batch_matches_each_prompt_alone(gpu_models, record_property):
    model = gpu_models[torch.bfloat16]
    lengths = [3000, 517, 1, 4096]  # uneven, one single token, past the window and many compressed blocks
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1000, model.cfg.vocab_size - 1000, (n,), generator=g).cuda() for n in lengths]

    def cache():
        return PagedCache.for_requests(model.cfg, model.dtype, "cuda", len(lengths), max(lengths) + 8, kv_format="fp8")

    alone_cache, together_cache = cache(), cache()
    alone = torch.cat([model.prefill(p, alone_cache.admit(str(i), max(lengths) + 8), alone_cache.storage)
                       for i, p in enumerate(prompts)])
    seqs = [together_cache.admit(str(i), max(lengths) + 8) for i in range(len(lengths))]
    together = model.prefill_batch(list(zip(prompts, seqs)), together_cache.storage)
    errors = [_rel(together[i], alone[i]) for i in range(len(lengths))]
    record_property("per_prompt_rel_err", errors)
    print(f"\nbatched vs alone prefill (bf16 kernels), last logits rel err per prompt {lengths}: "
          + ", ".join(f"{e:.2e}" for e in errors))
    assert torch.isfinite(together).all()
    # the GEMMs see another M, so cuBLAS may round differently
    assert max(errors) < 2e-2
    tokens = torch.tensor([5, 6, 7, 8], device="cuda")
    step_alone = model.decode(tokens, [alone_cache.seqs[str(i)] for i in range(len(lengths))], alone_cache.storage)
    step_together = model.decode(tokens, seqs, together_cache.storage)
    assert _rel(step_together, step_alone) < 2e-2


def test_a_kernel_pass_over_continued_prompts_equals_the_float32_reference(gpu_models, record_property):
    """float32: one kernel-path pass over chunks that continue earlier ones (past the window and many
    compressed blocks), a one-token chunk and a fresh prompt, against the reference path prompt by prompt,
    and the next decode step from the pages each leaves."""
    model = gpu_models[torch.float32]
    firsts, rests = [700, 2048, 0, 90], [1300, 1, 517, 37]
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(1000, model.cfg.vocab_size - 1000, (a + b,), generator=g).cuda() for a, b in zip(firsts, rests)]

    reference, reference_next = continued_pass(model, prompts, firsts, False, 2600, [5, 6, 7, 8])
    kernels, kernels_next = continued_pass(model, prompts, firsts, True, 2600, [5, 6, 7, 8])
    errors = [_rel(kernels[i], reference[i]) for i in range(4)]
    record_property("per_prompt_rel_err", errors)
    print("\nkernel pass vs float32 reference, last logits rel err per prompt: " + ", ".join(f"{e:.2e}" for e in errors))
    assert torch.isfinite(kernels).all()
    assert max(errors) < 1e-3 and _rel(kernels_next, reference_next) < 1e-3


def test_a_prefill_pass_and_a_handoff_never_wait_for_the_gpu(gpu_models):
    """A pass over several prompts (a continued chunk among them), the export of a finished prompt,
    its import into decode's pool and its row in decode's slots queue all their work on the stream:
    no host synchronisation (which would let the GPU run dry while the host launches the next layer)."""
    from dsv4.backend.model.decode_batch import DecodeSlots
    from dsv4.backend.serving.handoff import export_state, import_state

    model = gpu_models[torch.bfloat16]
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(1000, model.cfg.vocab_size - 1000, (n,), generator=g).cuda() for n in (700, 300, 1500)]
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cuda", 4, 4096, kv_format="fp8")
    seqs = [cache.admit(str(i), 4096) for i in range(3)]
    model.prefill_batch([(prompts[0][:256], seqs[0])], cache.storage)  # warm; prompt 0 continues below
    slots = DecodeSlots(4, 4096, "cuda")
    target = cache.admit("decode", 4096)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.prefill_batch([(prompts[0][256:], seqs[0]), (prompts[1], seqs[1]), (prompts[2], seqs[2])], cache.storage)
        header, payload = export_state(cache.storage, seqs[1])
        import_state(cache.storage, target, header, payload)
        slots.add(target, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
