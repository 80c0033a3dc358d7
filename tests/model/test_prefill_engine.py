"""Batched prefill: several prompts' chunks in one pass compute what each prompt computes alone, and
the prefill engine schedules them (together, fewest chunks first, within a token budget), frees
every block on cancellation and failure, and keeps serving."""

from __future__ import annotations

import threading

import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.handoff import import_state
from dsv4.backend.serving.prefill_engine import PrefillEngine, PrefillSettings
from dsv4.backend.serving.prefill_stage import PrefillStage
from dsv4.backend.serving.request import RequestConfig

from .continued_pass import continued_pass
from .oracle import CONFIG_A, CONFIG_KERNELS, build_hf, rel_err, save_hf

MAX_LEN = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(build_hf(CONFIG_A, seed=6), tmp_path_factory.mktemp("prefill-engine"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, progress=False)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _stage(model_dir, max_prompts: int = 4) -> PrefillStage:
    return PrefillStage(model_dir, "cpu", torch.float32, MAX_LEN, 64 << 20, snapshot_interval=1, max_prompts=max_prompts)


def _decode_after(model, header, payload, steps: int = 3) -> torch.Tensor:
    """Logits of a few greedy decode steps from an exported state: the state as decode uses it."""
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 1, header.position + steps + 1)
    seq = cache.admit("d", header.position + steps + 1)
    import_state(cache.storage, seq, header, payload)
    token, outs = torch.tensor([7]), []
    for _ in range(steps):
        logits = model.decode(token, [seq], cache.storage)
        outs.append(logits)
        token = logits.argmax(-1)
    return torch.cat(outs)


def test_prefill_batch_equals_each_prompt_alone(model):
    # the reference path; the kernel path's pass is checked against it below
    kernels, lengths = False, [37, 5, 70]
    prompts = [torch.tensor(_prompt(n, i)) for i, n in enumerate(lengths)]

    def cache_with(n):
        cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", n, 128)
        cache.storage.use_kernels = kernels
        return cache

    alone_cache, together_cache = cache_with(3), cache_with(3)
    alone = []
    for i, p in enumerate(prompts):
        seq = alone_cache.admit(str(i), 128)
        alone.append(model.prefill(p, seq, alone_cache.storage))
    seqs = [together_cache.admit(str(i), 128) for i in range(3)]
    together = model.prefill_batch([(p, s) for p, s in zip(prompts, seqs)], together_cache.storage)
    assert together.shape == (3, model.cfg.vocab_size) and torch.isfinite(together).all()
    assert rel_err(together, torch.cat(alone)) < 1e-5
    assert [s.position for s in seqs] == lengths
    # the pages written are the ones each prompt writes alone: the next decode step agrees
    tokens = torch.tensor([1, 2, 3])
    a = model.decode(tokens, [alone_cache.seqs[str(i)] for i in range(3)], alone_cache.storage)
    b = model.decode(tokens, seqs, together_cache.storage)
    assert rel_err(b, a) < 1e-5


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return load_model(save_hf(build_hf(CONFIG_KERNELS, seed=8), tmp_path_factory.mktemp("prefill-pass")), progress=False)


def test_kernel_pass_over_continued_prompts_equals_the_reference(small_model):
    """One kernel-path pass over chunks that continue earlier ones (window history shorter than, and as long
    as, the window; a chunk longer than the window crossing an HCA entry; a fresh prompt) against the
    reference path run prompt by prompt, and the pages it leaves (the next decode step)."""
    model = small_model
    firsts, rests = [3, 12, 0], [2, 9, 5]  # window 8, CSA rate 4, HCA rate 16
    prompts = [torch.tensor(_prompt(a + b, 40 + i)) for i, (a, b) in enumerate(zip(firsts, rests))]

    reference, reference_next = continued_pass(model, prompts, firsts, False, 32, [1, 2, 3])
    kernels, kernels_next = continued_pass(model, prompts, firsts, True, 32, [1, 2, 3])
    assert torch.isfinite(kernels).all()
    assert rel_err(kernels, reference) < 1e-4
    assert rel_err(kernels_next, reference_next) < 1e-4


def test_prefill_batch_refuses_an_empty_chunk(model):
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 1, 64)
    with pytest.raises(ValueError, match="empty chunk"):
        model.prefill_batch([(torch.tensor([], dtype=torch.long), cache.admit("a", 64))], cache.storage)


class Collector:
    """The engine's sink: results by request id, and an event per request."""

    def __init__(self):
        self.results, self.errors, self.order = {}, {}, []
        self.done: dict[int, threading.Event] = {}

    def event(self, rid):
        return self.done.setdefault(rid, threading.Event())

    def __call__(self, rid, result, error):
        if error is None:
            self.results[rid] = result
        else:
            self.errors[rid] = error
        self.order.append(rid)
        self.event(rid).set()

    def wait(self, *rids, timeout=120):
        for rid in rids:
            assert self.event(rid).wait(timeout), f"request {rid} got no answer"


def _config(n: int, seed: int = 1) -> RequestConfig:
    return RequestConfig(max_tokens=4, temperature=0.0, seed=seed, num_input_tokens=n)


def _engine(stage, sink, **settings):
    values = dict(chunk=256, token_budget=1024, max_prompts=4, gather_s=0.05) | settings
    return PrefillEngine(stage, PrefillSettings(**values), sink)


def _assert_payloads_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Float pages and accumulators (which start at -inf): the same non-finite entries, the rest close."""
    a, b = got.view(torch.float32), want.view(torch.float32)
    finite = b.isfinite()
    assert torch.equal(a.isfinite(), finite) and torch.equal(a[~finite], b[~finite])
    assert rel_err(a[finite], b[finite]) < 1e-5


def _blocks_held(stage) -> dict[str, int]:
    return {kind: u.used for kind, u in stage.cache.manager.usage().items()}


def test_waiting_prompts_run_together_and_match_a_lone_run(model_dir, model):
    lengths = [700, 40, 300]  # 3 chunks of 256, 1, 2 (the 700 one also stops at its cache points)
    prompts = [_prompt(n, 10 + i) for i, n in enumerate(lengths)]
    lone = _stage(model_dir)
    expected = [lone.run(p, _config(len(p)), chunk=256) for p in prompts]

    stage, sink = _stage(model_dir), Collector()
    engine = _engine(stage, sink)
    for rid, p in enumerate(prompts):  # queued before the loop starts: they wait together
        engine.submit(rid, p, _config(len(p)), lambda: False)
    engine.start()
    try:
        sink.wait(0, 1, 2)
    finally:
        engine.stop()
    assert not sink.errors
    assert sink.order[0] == 1, "the one-chunk prompt answers after the first pass"
    # one pass takes a chunk of every prompt: 3 passes where one at a time takes 3 + 1 + 2
    assert list(engine.step_sizes) == [(3, 256 + 40 + 256), (2, 256 + 44), (1, 188)]
    assert (stage.stats.steps, lone.stats.steps) == (3, 6)
    for rid, want in enumerate(expected):
        got = sink.results[rid]
        assert got.first_token == want.first_token and got.header == want.header
        _assert_payloads_close(got.payload, want.payload)
    assert rel_err(_decode_after(model, got.header, got.payload), _decode_after(model, want.header, want.payload)) < 1e-5
    assert all(v == 0 for v in _blocks_held(stage).values()), _blocks_held(stage)


def test_a_short_arrival_starts_beside_a_long_prompt(model_dir):
    stage, sink = _stage(model_dir), Collector()
    engine = _engine(stage, sink, chunk=128, token_budget=256, gather_s=0.0)
    first_pass = threading.Event()
    step = stage.step

    def step_then_signal(plan):
        out = step(plan)
        first_pass.set()
        return out

    stage.step = step_then_signal
    engine.start()
    try:
        engine.submit(0, _prompt(1200, 3), _config(1200), lambda: False)  # ten chunks of 128
        assert first_pass.wait(60)
        engine.submit(1, _prompt(30, 4), _config(30), lambda: False)
        sink.wait(0, 1)
    finally:
        engine.stop()
    assert sink.order == [1, 0], "the short prompt waited for the long one"
    assert max(p for p, _ in engine.step_sizes) == 2 and max(t for _, t in engine.step_sizes) <= 256


def test_cancelled_and_failed_prompts_free_their_blocks_and_the_engine_goes_on(model_dir):
    stage, sink = _stage(model_dir), Collector()
    engine = _engine(stage, sink, chunk=128, token_budget=256, gather_s=0.0)
    cancel = threading.Event()
    step, calls = stage.step, []

    def flaky_step(plan):
        calls.append(len(plan))
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        out = step(plan)
        cancel.set()  # request 0 is cancelled once it has run a chunk
        return out

    stage.step = flaky_step
    engine.start()
    try:
        engine.submit(0, _prompt(900, 5), _config(900), cancel.is_set)
        sink.wait(0)
        engine.submit(1, _prompt(400, 6), _config(400), lambda: False)  # the injected failure hits it
        sink.wait(1)
        engine.submit(2, _prompt(50, 7), _config(50), lambda: False)
        sink.wait(2)
    finally:
        engine.stop()
    assert sink.errors[0][0] == "CANCELLED" and "of 900 prompt tokens" in sink.errors[0][1]
    assert sink.errors[1] == ("INTERNAL", "prefill failed: injected failure")
    assert 2 in sink.results and 2 not in sink.errors
    assert all(v == 0 for v in _blocks_held(stage).values()), _blocks_held(stage)
    stage.cache.manager.check_integrity()


def test_a_prompt_the_pool_can_never_hold_is_refused_and_a_full_queue_answers_unavailable(model_dir):
    from dsv4.backend.serving.prefill_engine import NO_ROOM_MESSAGE, TOO_BIG_MESSAGE

    small = PrefillStage(model_dir, "cpu", torch.float32, 512, 4 << 20, snapshot_interval=0, max_prompts=1)
    sink = Collector()
    engine = _engine(small, sink, max_prompts=1, max_waiting=1)
    too_long = 4 * small.cache.manager.usage()["csa_kv"].total * 256  # far past the compressed pool
    engine.submit(0, _prompt(too_long, 1), _config(too_long), lambda: False)
    engine.submit(1, _prompt(20, 2), _config(20), lambda: False)  # the queue holds one
    engine.start()
    try:
        sink.wait(0, 1)
    finally:
        engine.stop()
    assert sink.errors[1] == ("UNAVAILABLE", NO_ROOM_MESSAGE)
    assert sink.errors[0] == ("UNAVAILABLE", TOO_BIG_MESSAGE)


def test_settings_refuse_a_budget_below_one_chunk():
    with pytest.raises(ValueError, match="token_budget >= chunk"):
        PrefillSettings(chunk=512, token_budget=256, max_prompts=2)


def test_warm_up_leaves_the_serving_cache_untouched(model_dir):
    stage = _stage(model_dir)
    before = stage.cache.manager.usage()
    assert stage.warm_up(64) >= 0
    assert stage.cache.manager.usage() == before and stage.stats.steps == 0
