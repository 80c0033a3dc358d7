"""The served decode loop on the GPU: one step ahead (tokens read through a pinned buffer after the
next step is launched) it streams exactly what the plain loop streams, cancels mid-flight and frees
every block; its steps per second beside the plain loop's are printed."""

from __future__ import annotations

import queue
import time

import torch

from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.decode_engine import Arrival, DecodeEngine
from dsv4.backend.serving.handoff import export_state
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.tokenizer import TextCodec

LENGTHS = [100, 333, 517, 64, 250, 901, 77, 1200]
TOKENS = 40  # every request the same length: both loops run the same batches, so the same bits
MAX_LEN = 2048


def _arrivals(model) -> list[Arrival]:
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cuda", 1, MAX_LEN, kv_format="fp8")
    g = torch.Generator().manual_seed(9)
    out = []
    for rid, n in enumerate(LENGTHS):
        seq = cache.admit(str(rid), n)
        ids = torch.randint(1000, model.cfg.vocab_size - 1000, (n,), generator=g).cuda()
        first = int(prefill_prompt(model, cache.storage, seq, ids, chunk=8192)[-1].argmax())
        header, payload = export_state(cache.storage, seq)
        cache.release(str(rid))
        config = RequestConfig(max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.0, seed=rid, stream=True,
                               num_input_tokens=n)
        out.append(Arrival(rid, config, first, header, payload.clone()))
    return out


def _serve(model, arrivals, lookahead: bool, cancel: int | None = None):
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cuda", len(arrivals), MAX_LEN, kv_format="fp8")
    sink: queue.Queue = queue.Queue()
    engine = DecodeEngine(model, cache, TextCodec.load(), lambda *item: sink.put(item), max_batch=len(arrivals),
                          max_model_len=MAX_LEN, lookahead=lookahead)
    for arrival in arrivals:
        engine.submit(arrival)
    engine.start()  # captures the graphs, then admits every arrival at once
    chunks = {a.rid: [] for a in arrivals}
    open_rids, started = set(chunks), None
    try:
        while open_rids:
            rid, chunk, error = sink.get(timeout=120)
            assert error is None, error
            started = started or time.perf_counter()
            chunks[rid].append(chunk)
            if rid == cancel and len(chunks[rid]) == 5:
                engine.cancel(rid)
            if chunk.final:
                open_rids.discard(rid)
        seconds = time.perf_counter() - started
        time.sleep(0.2)
    finally:
        engine.stop()
    assert engine.active == {} and engine.runner.size == 0
    assert all(u.used == 0 for u in cache.manager.usage().values())
    return chunks, engine.stats.steps / seconds


def test_one_step_ahead_streams_what_the_plain_loop_streams(gpu_models, record_property):
    model = gpu_models[torch.bfloat16]
    arrivals = _arrivals(model)
    plain, plain_rate = _serve(model, arrivals, lookahead=False)
    ahead, ahead_rate = _serve(model, arrivals, lookahead=True)
    for rid in plain:
        assert [t for c in ahead[rid] for t in c.token_ids] == [t for c in plain[rid] for t in c.token_ids], rid
        assert "".join(c.text for c in ahead[rid]) == "".join(c.text for c in plain[rid])
        assert ahead[rid][-1].finish_reason == "length" and ahead[rid][-1].num_output_tokens == TOKENS
    record_property("steps_per_s_plain", plain_rate)
    record_property("steps_per_s_ahead", ahead_rate)
    print(f"\nengine at batch {len(arrivals)}: {plain_rate:.0f} steps/s plain, {ahead_rate:.0f} one step ahead")
    cancelled, _ = _serve(model, arrivals, lookahead=True, cancel=3)
    assert cancelled[3][-1].finish_reason == "cancelled" and cancelled[3][-1].num_output_tokens < TOKENS
