"""Prefill and decode in one process on the GPU (`Colocated`, two streams of different priority):
running streams compute the same logits, within bf16 rounding, whether or not a long prompt is
prefilled beside them (compared step by step while their inputs are the same: a greedy token may
flip where two logits nearly tie), and the run says whether they were equal to the bit; the long
prompt gives what it gives alone; nothing stays held. The long prompt's decode row waits until the
streams end (`max_batch` = their count): a step of another batch size is another graph, whose rows
need not match the smaller one's to the bit. Prints the streams' inter-token
gaps with and without the concurrent prefill (figures for PERFORMANCE.md come from bench_e2e)."""

from __future__ import annotations

import queue
import statistics
import time

import numpy as np
import torch

from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.colocated import Colocated
from dsv4.backend.serving.decode_engine import DecodeEngine
from dsv4.backend.serving.prefill_engine import PrefillSettings
from dsv4.backend.serving.prefill_stage import PrefillStage
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.serving.streams import stage_streams
from dsv4.backend.tokenizer import TextCodec

SHORT = [100, 333, 517, 64, 250, 901, 77, 1200]
LONG = 24_000
TOKENS = 128  # long enough for the long prompt's prefill to run beside the streams
MAX_LEN = LONG + TOKENS + 64
LONG_RID = 99


def _prompts(cfg) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(21)
    lengths = {**dict(enumerate(SHORT)), LONG_RID: LONG}
    return {rid: torch.randint(1000, cfg.vocab_size - 1000, (n,), generator=g).tolist() for rid, n in lengths.items()}


def _config(rid: int, n: int) -> RequestConfig:
    return RequestConfig(max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.0, seed=rid, stream=True, num_input_tokens=n)


def _run(model, prompts: dict[int, list[int]], rids: list[int], long_after_tokens: int | None):
    """Serve `rids` submitted together; with `long_after_tokens`, the long prompt arrives once the
    first stream has that many tokens. Returns ({rid: tokens}, {rid: chunk arrival times}, the
    logits of each step that ran exactly `rids`)."""
    streams = stage_streams(model.device)
    stage = PrefillStage(None, "cuda", model.dtype, MAX_LEN, 4 << 30, kv_format="fp8", max_prompts=8, model=model)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cuda", len(SHORT) + 1, MAX_LEN, kv_format="fp8")
    sink: queue.Queue = queue.Queue()
    decode = DecodeEngine(model, cache, TextCodec.load(), lambda *item: sink.put(item), max_batch=len(SHORT),
                          max_model_len=MAX_LEN, stream=streams.decode)
    colocated = Colocated(stage, PrefillSettings(chunk=4096, token_budget=8192, max_prompts=8), decode,
                          lambda *item: sink.put(item), streams.prefill)
    logits = []  # every step's logits of the streams' rows (a step runs all of them while they last)
    step = decode.runner.step

    def recording_step():
        tokens = step()
        if decode.runner.size == len(rids):
            logits.append(decode.runner.last_logits.float().clone())
        return tokens

    decode.runner.step = recording_step
    for rid in rids:  # queued before the loops start: every run prefills them in one pass
        colocated.submit(rid, np.array(prompts[rid], dtype=np.int32), _config(rid, len(prompts[rid])))
    # decode starts once every state is handed over, so all rows join its first step in every run
    # (rows that join a step apart run some steps at another batch size: another graph, other bits)
    colocated.prefill.start()
    deadline = time.monotonic() + 120
    while decode.arrivals.qsize() < len(rids):
        assert time.monotonic() < deadline, "prefill did not hand every prompt over"
        time.sleep(0.01)
    decode.start()
    tokens = {rid: [] for rid in rids}
    times = {rid: [] for rid in rids}
    open_rids = set(rids)
    try:
        while open_rids:
            rid, chunk, error = sink.get(timeout=300)
            assert error is None, (rid, error)
            tokens[rid] += chunk.token_ids
            times[rid].append(time.perf_counter())
            if long_after_tokens is not None and rid == rids[0] and len(tokens[rid]) == long_after_tokens:
                tokens[LONG_RID], times[LONG_RID] = [], []
                open_rids.add(LONG_RID)
                colocated.submit(LONG_RID, np.array(prompts[LONG_RID], dtype=np.int32), _config(LONG_RID, LONG))
            if chunk.final:
                open_rids.discard(rid)
        time.sleep(0.2)
    finally:
        colocated.stop()
    assert decode.active == {} and decode.runner.size == 0 and colocated.held_requests() == 0
    for pool in (cache, stage.cache):
        assert all(u.used == 0 for u in pool.manager.usage().values())
    return tokens, times, logits


def _gaps_ms(times: dict[int, list[float]], rids) -> list[float]:
    return [(b - a) * 1e3 for rid in rids for a, b in zip(times[rid], times[rid][1:])]


def _compare(rids, tokens_a, logits_a, tokens_b, logits_b) -> tuple[int, int, float]:
    """(steps whose inputs were the same in both runs, of those the steps with bitwise-equal logits,
    the largest difference relative to the largest logit); prints where step 0 differs."""
    # step k's inputs are each stream's tokens 0..k: the same in both runs up to the first that differs
    same = min(next((k for k, (a, b) in enumerate(zip(tokens_a[r], tokens_b[r])) if a != b), TOKENS) for r in rids)
    bitwise, worst = 0, 0.0
    for k, (a, b) in enumerate(zip(logits_a[:same], logits_b[:same])):
        bitwise += bool(torch.equal(a, b))
        finite = torch.isfinite(a) & torch.isfinite(b)
        diff = torch.where(finite, (a - b).abs(), torch.zeros_like(a))
        worst = max(worst, float(diff.max() / a[finite].abs().max()))
        if k == 0:
            row, col = divmod(int(diff.argmax()), a.shape[1])
            print(f"  step 0: {int((a != b).sum())} of {a.numel()} logits differ ({int((~finite).sum())} not finite); "
                  f"largest at row {row} column {col}: {float(a[row, col]):.4g} vs {float(b[row, col]):.4g}; "
                  f"rows' argmax {a.argmax(1).tolist()} vs {b.argmax(1).tolist()}; shapes {tuple(a.shape)} {tuple(b.shape)}")
    return same, bitwise, worst


def test_streams_are_the_same_with_a_long_prefill_beside_them(gpu_models):
    model = gpu_models[torch.bfloat16]
    prompts = _prompts(model.cfg)
    short = list(range(len(SHORT)))
    _run(model, prompts, short[:2], None)  # compiles every kernel variant first: the timed runs need none
    alone, alone_times, alone_logits = _run(model, prompts, short, None)
    again, _, again_logits = _run(model, prompts, short, None)
    beside, beside_times, beside_logits = _run(model, prompts, short, long_after_tokens=8)
    assert all(len(alone[rid]) == TOKENS for rid in short)
    print()
    found = {}
    for name, tokens, logits in (("alone again", again, again_logits), ("beside a long prefill", beside, beside_logits)):
        found[name] = same_inputs, bitwise, worst = _compare(short, alone, alone_logits, tokens, logits)
        print(f"streams {name}: tokens equal for {same_inputs} of {TOKENS} steps; logits of {bitwise} of {same_inputs} "
              f"steps equal to the bit, largest difference {worst:.3g} of the largest logit")
    for name, (same_inputs, _, worst) in found.items():
        assert same_inputs > 8 and worst < 2e-2, name  # bf16 rounding, not another request's state
    long_alone, _, _ = _run(model, prompts, [LONG_RID], None)
    assert beside[LONG_RID] == long_alone[LONG_RID]
    quiet, busy = _gaps_ms(alone_times, short), _gaps_ms(beside_times, short)
    print(f"inter-token gaps of {len(short)} streams: alone p50 {statistics.median(quiet):.2f} ms, "
          f"p99 {np.percentile(quiet, 99):.2f} ms; beside a {LONG:,}-token prefill p50 {statistics.median(busy):.2f} ms, "
          f"p99 {np.percentile(busy, 99):.2f} ms")
