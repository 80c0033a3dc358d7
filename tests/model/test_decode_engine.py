"""The decode engine one step ahead (the GPU's loop: step N launched before step N-1's tokens are
read) gives every request what the plain loop gives it, ends requests on time, and frees every block,
cancelled ones included."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.decode_engine import Arrival, DecodeEngine
from dsv4.backend.serving.prefill_stage import PrefillStage
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.tokenizer import TextCodec

from .oracle import CONFIG_A, build_hf, save_hf

MAX_LEN = 256
# (prompt tokens, max_tokens, stream, temperature, min_tokens): ragged lengths, so rows end at different steps
REQUESTS = [(9, 1, True, 0.0, 0), (17, 3, True, 0.0, 0), (5, 8, False, 0.0, 0), (30, 13, True, 0.8, 4),
            (12, 20, True, 0.0, 0), (3, 6, False, 1.0, 6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(build_hf(CONFIG_A, seed=11), tmp_path_factory.mktemp("decode-engine"))


@pytest.fixture(scope="module")
def arrivals(model_dir):
    """Every request prefilled once: the same arrivals feed both loops."""
    stage = PrefillStage(model_dir, "cpu", torch.float32, MAX_LEN, 64 << 20, max_prompts=1)
    g = torch.Generator().manual_seed(4)
    out = []
    for rid, (n, max_tokens, stream, temperature, min_tokens) in enumerate(REQUESTS):
        config = RequestConfig(max_tokens=max_tokens, stream=stream, temperature=temperature, seed=100 + rid,
                               min_tokens=min_tokens, num_input_tokens=n)
        done = stage.run(torch.randint(0, 512, (n,), generator=g).tolist(), config)
        out.append(Arrival(rid, config, done.first_token, done.header, done.payload))
    return out


def _serve(model_dir, arrivals, lookahead: bool, cancel: int | None = None) -> tuple[dict, DecodeEngine]:
    """Run the engine over every arrival; returns {rid: [chunks]} once each request has its final one."""
    model = load_model(model_dir, progress=False)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(arrivals), MAX_LEN)
    sink: queue.Queue = queue.Queue()
    engine = DecodeEngine(model, cache, TextCodec.load(model_dir), lambda *item: sink.put(item), max_batch=8,
                          max_model_len=MAX_LEN, lookahead=lookahead)
    for arrival in arrivals:  # all queued before the loop starts: both runs batch them alike
        engine.submit(arrival)
    engine.start()
    chunks: dict[int, list] = {a.rid: [] for a in arrivals}
    open_rids, deadline = set(chunks), time.monotonic() + 120
    try:
        while open_rids:
            rid, chunk, error = sink.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert error is None, error
            chunks[rid].append(chunk)
            if cancel == rid and len(chunks[rid]) == 2:
                engine.cancel(rid)
            if chunk.final:
                open_rids.discard(rid)
        time.sleep(0.1)  # a step still in flight is read and its rows dropped
    finally:
        engine.stop()
    return chunks, engine


def _summary(chunks: list) -> tuple:
    return ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1].finish_reason,
            chunks[-1].num_output_tokens)


def _assert_nothing_held(engine: DecodeEngine) -> None:
    assert engine.active == {} and engine.runner.size == 0
    assert all(u.used == 0 for u in engine.cache.manager.usage().values())
    engine.cache.manager.check_integrity()


def test_one_step_ahead_gives_the_same_outputs_and_frees_everything(model_dir, arrivals):
    plain, plain_engine = _serve(model_dir, arrivals, lookahead=False)
    ahead, ahead_engine = _serve(model_dir, arrivals, lookahead=True)
    for rid, (_, max_tokens, stream, _, min_tokens) in enumerate(REQUESTS):
        tokens, text, reason, count = _summary(ahead[rid])
        assert (tokens, text, reason, count) == _summary(plain[rid]), rid
        assert reason in ("stop", "length") and min_tokens <= count <= max_tokens
        assert len(ahead[rid]) == (count if stream else 1)  # a chunk per token when streamed
    _assert_nothing_held(plain_engine)
    _assert_nothing_held(ahead_engine)
    # at most one step more than the plain loop: the step in flight when the last request ended
    assert ahead_engine.stats.steps <= plain_engine.stats.steps + 1


def test_cancelled_while_a_step_is_in_flight(model_dir, arrivals):
    longest = max(range(len(REQUESTS)), key=lambda i: REQUESTS[i][1])
    chunks, engine = _serve(model_dir, arrivals, lookahead=True, cancel=longest)
    assert chunks[longest][-1].finish_reason == "cancelled"
    assert chunks[longest][-1].num_output_tokens < REQUESTS[longest][1]
    _assert_nothing_held(engine)


def test_a_request_decode_cannot_start_fails_alone(model_dir, arrivals):
    """A request the runner refuses (here: no resolved seed, which the tokenizer stage always sets)
    gets INTERNAL and its blocks back; the loop keeps serving the others."""
    from dataclasses import replace

    bad = replace(arrivals[4], config=replace(arrivals[4].config, seed=None))
    model = load_model(model_dir, progress=False)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(arrivals), MAX_LEN)
    sink: queue.Queue = queue.Queue()
    engine = DecodeEngine(model, cache, TextCodec.load(model_dir), lambda *item: sink.put(item), max_batch=8,
                          max_model_len=MAX_LEN, lookahead=True)
    for arrival in [*arrivals[:4], bad, arrivals[5]]:
        engine.submit(arrival)
    engine.start()
    ended: dict[int, tuple] = {}
    try:
        while len(ended) < len(arrivals):
            rid, chunk, error = sink.get(timeout=60)
            if error is not None or chunk.final:
                ended[rid] = (chunk, error)
        time.sleep(0.1)
    finally:
        engine.stop()
    assert ended[4][1][0] == "INTERNAL" and "seed" in ended[4][1][1]
    assert all(ended[rid][1] is None and ended[rid][0].finish_reason in ("stop", "length") for rid in ended if rid != 4)
    _assert_nothing_held(engine)
