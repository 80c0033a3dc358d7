"""Prefill and decode in one process (`Colocated`): prompts handed to the shared-weights prefill
engine stream what the two stages stream when prefill runs alone and hands its state over;
cancellation in either stage and a prompt prefill refuses end that request only, and nothing stays
held in either pool."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.colocated import CANCELLED_MESSAGE, Colocated
from dsv4.backend.serving.decode_engine import Arrival, DecodeEngine
from dsv4.backend.serving.prefill_engine import PrefillSettings
from dsv4.backend.serving.prefill_stage import PrefillStage
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.tokenizer import TextCodec

from .oracle import CONFIG_A, build_hf, save_hf

MAX_LEN = 256
# (prompt tokens, max_tokens, stream, temperature): ragged, so prompts share passes and rows end apart
REQUESTS = [(9, 4, True, 0.0), (40, 6, True, 0.0), (5, 8, False, 0.0), (30, 5, True, 0.8), (17, 7, True, 0.0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(build_hf(CONFIG_A, seed=17), tmp_path_factory.mktemp("colocated"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, progress=False)


def _config(rid: int, n: int, max_tokens: int, stream: bool, temperature: float) -> RequestConfig:
    return RequestConfig(max_tokens=max_tokens, stream=stream, temperature=temperature, seed=300 + rid,
                         num_input_tokens=n)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(8)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n, *_ in REQUESTS]


def _decode(model, model_dir, sink) -> DecodeEngine:
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(REQUESTS), MAX_LEN)
    return DecodeEngine(model, cache, TextCodec.load(model_dir), sink, max_batch=8, max_model_len=MAX_LEN)


def _colocated(model, model_dir, sink, chunk: int = 32) -> Colocated:
    stage = PrefillStage(None, "cpu", model.dtype, MAX_LEN, 32 << 20, snapshot_interval=1, max_prompts=4, model=model)
    settings = PrefillSettings(chunk=chunk, token_budget=2 * chunk, max_prompts=4)
    return Colocated(stage, settings, _decode(model, model_dir, sink), sink)


def _collect(sink: queue.Queue, rids, on_chunk=None) -> dict[int, tuple[list, tuple | None]]:
    """Every request's chunks until its final one or its error."""
    out: dict[int, tuple[list, tuple | None]] = {rid: ([], None) for rid in rids}
    open_rids, deadline = set(rids), time.monotonic() + 120
    while open_rids:
        rid, chunk, error = sink.get(timeout=max(deadline - time.monotonic(), 0.1))
        if error is not None:
            out[rid] = (out[rid][0], error)
            open_rids.discard(rid)
            continue
        out[rid][0].append(chunk)
        if on_chunk is not None:
            on_chunk(rid, out[rid][0])
        if chunk.final:
            open_rids.discard(rid)
    time.sleep(0.1)  # a step in flight is read and its rows dropped
    return out


def _tokens(chunks: list) -> tuple[list[int], str]:
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


def _assert_nothing_held(colocated: Colocated) -> None:
    decode, stage = colocated.decode, colocated.prefill.stage
    assert decode.active == {} and decode.runner.size == 0 and colocated.held_requests() == 0
    for cache in (decode.cache, stage.cache):
        assert all(u.used == 0 for u in cache.manager.usage().values())
        cache.manager.check_integrity()


def test_prompts_stream_what_split_stages_stream(model, model_dir):
    prompts = _prompts()
    # split: each prompt prefilled alone by its own stage, its state handed to decode
    alone = PrefillStage(model_dir, "cpu", torch.float32, MAX_LEN, 32 << 20, max_prompts=1)
    sink: queue.Queue = queue.Queue()
    decode = _decode(model, model_dir, lambda *item: sink.put(item))
    for rid, (ids, request) in enumerate(zip(prompts, REQUESTS)):
        config = _config(rid, *request)
        done = alone.run(ids, config)
        decode.submit(Arrival(rid, config, done.first_token, done.header, done.payload))
    decode.start()
    try:
        split = _collect(sink, range(len(REQUESTS)))
    finally:
        decode.stop()
    # colocated: all prompts at once, prefilled together in chunks of 32 on the same weights
    sink = queue.Queue()
    colocated = _colocated(model, model_dir, lambda *item: sink.put(item))
    colocated.start()
    try:
        for rid, (ids, request) in enumerate(zip(prompts, REQUESTS)):
            colocated.submit(rid, np.array(ids, dtype=np.int32), _config(rid, *request))
        together = _collect(sink, range(len(REQUESTS)))
    finally:
        colocated.stop()
    for rid, (_, max_tokens, stream, _) in enumerate(REQUESTS):
        chunks, error = together[rid]
        assert error is None and split[rid][1] is None, (error, split[rid][1])
        assert _tokens(chunks) == _tokens(split[rid][0]), rid
        assert 1 <= chunks[-1].num_output_tokens <= max_tokens
    assert colocated.prefill.stage.stats.steps < sum(-(-n // 32) for n, *_ in REQUESTS)  # prompts shared passes
    _assert_nothing_held(colocated)


def test_cancelled_in_prefill_or_in_decode_and_a_refused_prompt_end_alone(model, model_dir):
    prompts = _prompts()
    sink: queue.Queue = queue.Queue()
    colocated = _colocated(model, model_dir, lambda *item: sink.put(item), chunk=8)
    colocated.cancel(0)  # an id nobody holds: no effect
    colocated.start()
    try:
        colocated.submit(1, np.array(prompts[1], dtype=np.int32), _config(1, *REQUESTS[1]))
        colocated.cancel(1)  # 40 tokens in chunks of 8: still in prefill
        colocated.submit(2, np.array([], dtype=np.int32), _config(2, *REQUESTS[2]))  # prefill refuses it
        colocated.submit(4, np.array(prompts[4], dtype=np.int32), _config(4, 17, 7, True, 0.0))
        colocated.submit(3, np.array(prompts[3], dtype=np.int32), _config(3, *REQUESTS[3]))

        def cancel_after_two(rid, chunks):
            if rid == 4 and len(chunks) == 2:
                colocated.cancel(4)

        out = _collect(sink, [1, 2, 3, 4], cancel_after_two)
    finally:
        colocated.stop()
    assert out[1][1][0] == "CANCELLED" and (out[1][1][1].startswith("prefill cancelled") or out[1][1][1] == CANCELLED_MESSAGE)
    assert out[2][1][0] == "INTERNAL" and "at least one prompt token" in out[2][1][1]
    assert out[3][1] is None and out[3][0][-1].finish_reason in ("stop", "length")
    assert out[4][1] is None and out[4][0][-1].finish_reason == "cancelled" and out[4][0][-1].num_output_tokens < 7
    _assert_nothing_held(colocated)
