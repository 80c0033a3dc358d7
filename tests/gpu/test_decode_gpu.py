"""The decode step on the H200: graphs equal eager to the bit, rows holding one state agree to the bit,
the kernel path stays within the bf16 bound of the float32 reference, and nothing waits for the host."""

from __future__ import annotations

import os

import pytest
import torch

from dsv4.backend.decode_runner import DecodeRunner
from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.sampler import SamplingParams
from dsv4.backend.serving.handoff import export_state, import_state

GREEDY = SamplingParams(temperature=0.0)
CONTEXTS = [8192] + ([131072] if os.environ.get("DSV4_LONG", "1") == "1" else [])


def _prompt(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(1000, vocab - 1000, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


def _rows(model, context: int, batch: int, kv_format: str = "fp8", seed: int = 0, extra: int = 80):
    """A cache holding `batch` copies of one prefilled request (the handoff path), and its first token."""
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cuda", batch, context + extra, kv_format=kv_format)
    seq = cache.admit("r0", context + extra)
    logits = prefill_prompt(model, cache.storage, seq, _prompt(context, model.cfg.vocab_size, seed), chunk=8192)
    header, payload = export_state(cache.storage, seq)
    seqs = [seq]
    for b in range(1, batch):
        other = cache.admit(f"r{b}", context + extra)
        import_state(cache.storage, other, header, payload)
        seqs.append(other)
    return cache, seqs, int(logits[-1].argmax())


def _runner(model, cache, seqs, first: int, graphs: bool, params=GREEDY) -> DecodeRunner:
    runner = DecodeRunner(model, cache.storage, len(seqs), seqs[0].position + 80, model.cfg.eos_token_ids,
                          cuda_graphs=graphs)
    runner.capture([len(seqs)])
    for b, seq in enumerate(seqs):
        runner.add(seq, first, params, seed=b, step=1, min_tokens=0)
    return runner


def test_graph_replay_equals_eager_to_the_last_bit(gpu_models):
    model = gpu_models[torch.bfloat16]
    outs = []
    for graphs in (False, True):
        cache, seqs, first = _rows(model, 8192, 8)
        runner = _runner(model, cache, seqs, first, graphs, params=SamplingParams(temperature=0.8, top_p=0.9))
        assert bool(runner.graphs) == graphs
        steps = []
        for _ in range(12):
            tokens = runner.step()
            steps.append((runner.last_logits.clone(), tokens.clone()))
        outs.append(steps)
    for step, ((eager_logits, eager_tokens), (graph_logits, graph_tokens)) in enumerate(zip(*outs)):
        assert torch.equal(eager_logits, graph_logits), f"step {step}: graph logits differ from eager"
        assert torch.equal(eager_tokens, graph_tokens)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", [1, 2, 8, 32, 128])
def test_rows_holding_one_state_agree_to_the_bit(gpu_models, batch, context):
    model = gpu_models[torch.bfloat16]
    cache, seqs, first = _rows(model, context, batch)
    runner = _runner(model, cache, seqs, first, graphs=True)
    for step in range(4):
        runner.step()
        logits = runner.last_logits
        assert torch.isfinite(logits).all()
        differ = (logits != logits[:1]).any(dim=-1)
        assert not differ.any(), f"step {step}: rows {differ.nonzero().flatten().tolist()[:8]} differ from row 0"


def test_kernel_path_within_bf16_bound_of_fp32_reference(gpu_models, record_property):
    """64 greedy steps of the float32 reference path; the bf16 kernel path and the bf16 reference path
    teacher-forced on its tokens.

    The bf16 bound is what bf16 itself costs: the bf16 *reference* path's distance to float32. The
    kernel path must stay within 1.5x of its median relative logits error (or 2e-2, if larger) and
    lose at most 4 more greedy tokens of 64. (Single steps can jump to ~0.2 on both bf16 paths: a
    routing or indexer top-k choice near a tie flips, a discrete change no tolerance can absorb.)
    """
    ref_model, model = gpu_models[torch.float32], gpu_models[torch.bfloat16]
    context, steps = 1024, 64
    prompt = _prompt(context, model.cfg.vocab_size, 5)

    def prefilled(m, use_kernels):
        cache = PagedCache.for_requests(m.cfg, m.dtype, "cuda", 1, context + steps + 8, kv_format="float")
        cache.storage.use_kernels = use_kernels
        seq = cache.admit("r", context + steps + 8)
        logits = prefill_prompt(m, cache.storage, seq, prompt, chunk=512)
        return [m, cache, seq, logits[-1:]]

    ref = prefilled(ref_model, False)
    paths = {"kernels": prefilled(model, True), "bf16 reference": prefilled(model, False)}
    errors = {name: [] for name in paths}
    agree = dict.fromkeys(paths, 0)
    for _ in range(steps):
        token = ref[3].argmax(-1)
        for name, (m, cache, seq, logits) in paths.items():
            errors[name].append(float((logits.float() - ref[3]).norm() / ref[3].norm()))
            agree[name] += int(logits.argmax(-1) == token)
            paths[name][3] = m.decode(token, [seq], cache.storage)
        ref[3] = ref_model.decode(token, [ref[2]], ref[1].storage)
    median = {name: sorted(e)[len(e) // 2] for name, e in errors.items()}
    for name in paths:
        record_property(f"{name} median_rel_err", median[name])
        record_property(f"{name} greedy_agreement", agree[name])
        print(f"\n{name} (bf16) vs reference float32, {steps} teacher-forced steps: median rel err {median[name]:.4f}, "
              f"max {max(errors[name]):.4f}, greedy agreement {agree[name]}/{steps}")
    assert median["kernels"] <= max(1.5 * median["bf16 reference"], 2e-2)
    assert agree["kernels"] >= agree["bf16 reference"] - 4


@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
def test_no_host_sync_in_a_step(gpu_models, graphs):
    model = gpu_models[torch.bfloat16]
    cache, seqs, first = _rows(model, 4096, 4)
    # sampled rows with top-k / top-p exercise the device-side cutoffs too
    runner = _runner(model, cache, seqs, first, graphs, params=SamplingParams(temperature=0.7, top_k=50, top_p=0.9))
    runner.step()  # allocator and caches warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            runner.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_same_request_across_batch_sizes(gpu_models, record_property):
    """One request's logits at batch 1 and as row 0 of batches 8 and 32 (copies of it beside it).

    The attention, mHC, MoE-routing and sampling kernels split work by the request alone; the GEMMs are
    cuBLAS's and may pick another algorithm for another row count, so this records how far apart the
    rows land rather than asserting bit equality, and asserts they stay within bf16 rounding.
    """
    model = gpu_models[torch.bfloat16]
    first_logits = {}
    for batch in (1, 8, 32):
        cache, seqs, first = _rows(model, 8192, batch)
        runner = _runner(model, cache, seqs, first, graphs=True)
        runner.step()
        first_logits[batch] = runner.last_logits[0].float().clone()
    for batch in (8, 32):
        diff = float((first_logits[batch] - first_logits[1]).abs().max())
        rel = float((first_logits[batch] - first_logits[1]).norm() / first_logits[1].norm())
        same = bool(torch.equal(first_logits[batch], first_logits[1]))
        record_property(f"batch{batch}_vs_batch1_bitwise", same)
        print(f"\nrow 0 at batch {batch} vs batch 1: bitwise equal {same}, max abs diff {diff:.3g}, rel {rel:.3g}")
        assert rel < 1e-2
