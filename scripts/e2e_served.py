"""The served half of bench_e2e: dsv4-serve started once, measured through Triton's gRPC stream.

In order: the first request after the server reports ready (a prompt of the first --prompts
length, so it compares with that length's steady TTFT), TTFT by prompt length, each
concurrent-streams configuration, the inter-token latency of running streams while a long prompt
prefills (--itl-long), and one long prompt (--served-long). Every prompt starts with its own first
word, so none is served from the prefix cache.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

import numpy as np
from dsv4.scripts import server_metrics
from dsv4.scripts.bench_serving import _stream_timings, start_server, stream_arrivals, text_prompt

ITL_STREAMS = 4
ITL_PROMPT_TOKENS = 2048
# an upper bound only: the streams are cancelled once the long prompt's first token is in
ITL_STREAM_TOKENS = 16384
ITL_SETTLE_S = 0.5  # after the last stream's first token: its state reaches decode
ITL_BASELINE_S = 2.0
LONG_TOKENS_OUT = 16
PROMPT_MARGIN = 16  # the distinct first words add a few tokens to each prompt


def _phases(args) -> list[list[tuple[int, int]]]:
    """(prompt tokens, max_tokens) of the requests the server holds at once, phase by phase."""
    phases = [[(n, 2)] for n in args.prompts]
    phases += [[(context, tokens)] * streams for streams, context, tokens in args.served_streams]
    if args.itl_long:
        phases.append([(ITL_PROMPT_TOKENS, ITL_STREAM_TOKENS)] * ITL_STREAMS + [(args.itl_long, 2)])
    if args.served_long:
        phases.append([(args.served_long, LONG_TOKENS_OUT)])
    return phases


def cpu_pool_args(layout, phases: list[list[tuple[int, int]]]) -> list[str]:
    """--kv-cache-gib and --prefix-cache-gib that hold every phase's requests: decode reserves prompt +
    max_tokens for each request of a phase (a quarter spare), prefill three of the longest prompt
    (running and cached). On cuda dsv4-serve sizes both from measured GPU memory, as users run it."""
    def held(tokens: int) -> int:
        return layout.request_bytes(tokens + PROMPT_MARGIN).total

    decode = max(sum(held(p + t) for p, t in phase) for phase in phases) * 1.25
    prefill = 3 * max(held(p) for phase in phases for p, _ in phase)
    return ["--kv-cache-gib", f"{decode / 2**30 + 0.25:.2f}", "--prefix-cache-gib", f"{prefill / 2**30 + 0.25:.2f}"]


def server_args(args, layout) -> list[str]:
    phases = _phases(args)
    requests = [r for phase in phases for r in phase]
    rows = max(len(phase) for phase in phases)
    return ["--max-model-len", str(max(p + t for p, t in requests) + PROMPT_MARGIN),
            "--max-tokens-limit", str(max(t for _, t in requests)),
            "--max-sequences", str(rows), "--max-batch", str(rows),
            *(cpu_pool_args(layout, phases) if args.device == "cpu" else []), "--kv-format", args.kv_format,
            "--stage-layout", getattr(args, "stage_layout", "colocated"), *getattr(args, "serve_arg", [])]


class Streams:
    """Calls running in threads at once; `results()` joins them and re-raises the first error."""

    def __init__(self, calls: list) -> None:
        self._results: list = [None] * len(calls)
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(i, call), daemon=True)
                         for i, call in enumerate(calls)]
        for t in self._threads:
            t.start()

    def _run(self, i: int, call) -> None:
        try:
            self._results[i] = call()
        except Exception as e:  # noqa: BLE001 - handed to the caller by results()
            self._errors.append(e)

    def any_done(self) -> bool:
        return any(not t.is_alive() for t in self._threads)

    def results(self) -> list:
        for t in self._threads:
            t.join()
        if self._errors:
            raise RuntimeError("a stream failed; see the server log under runs/bench_e2e") from self._errors[0]
        return self._results


def ttft_s(url: str, prompt: str) -> float:
    return _stream_timings(url, prompt, 2)[0]


def concurrent_streams(url: str, prompts: list[str], tokens: int) -> dict:
    """Decode tokens/s of streams sent at once, each stream's TTFT (s, sorted), and tokens/s over the
    window in which all of them were decoding.

    tokens_per_s counts every token after each stream's first (the first is prefill's) over the
    span from the earliest first token to the latest last one: always defined, and below the
    batch's rate when prefill staggers the streams so that short outputs barely overlap. The
    all-decoding window is the like-for-like figure for in-process decode at that batch; it is
    empty (None) when the first streams finish before the last one starts."""
    return stream_rates(Streams([lambda p=p: stream_arrivals(url, p, tokens) for p in prompts]).results())


def stream_rates(results: list[tuple[float, list[tuple[float, int]]]]) -> dict:
    """concurrent_streams' figures from each stream's (sent, [(arrival, tokens), ...])."""
    ttfts = sorted(arr[0][0] - sent for sent, arr in results)
    start, end = min(arr[0][0] for _, arr in results), max(arr[-1][0] for _, arr in results)
    decoded = sum(n for _, arr in results for _, n in arr[1:])
    lo, hi = max(arr[0][0] for _, arr in results), min(arr[-1][0] for _, arr in results)
    in_window = sum(n for _, arr in results for at, n in arr if lo < at <= hi)
    return {"tokens_per_s": decoded / (end - start) if end > start else None,
            "all_decoding_tokens_per_s": in_window / (hi - lo) if hi > lo else None,
            "all_decoding_s": max(hi - lo, 0.0), "ttft_s": ttfts[len(ttfts) // 2], "ttfts_s": ttfts,
            "stream_tokens": [sum(n for _, n in arr) for _, arr in results]}


def long_prompt(url: str, codec, tokens: int, timeout_s: float) -> dict:
    """One prompt of `tokens` with LONG_TOKENS_OUT out: TTFT and the mean time between its later tokens."""
    prompt = f"long{tokens} " + text_prompt(codec, tokens)
    sent, arrivals = stream_arrivals(url, prompt, LONG_TOKENS_OUT, timeout_s=timeout_s)
    first, last = arrivals[0][0], arrivals[-1][0]
    later = sum(n for _, n in arrivals[1:])
    return {"prompt_tokens": tokens, "tokens_out": LONG_TOKENS_OUT, "ttft_s": first - sent,
            "decode_ms_per_token": (last - first) / later * 1e3 if later else None}


def _gaps_ms(streams: list[list[tuple[float, int]]], lo: float, hi: float, overlapping: bool) -> list[float]:
    """Times between consecutive token arrivals of each stream, within [lo, hi] or (overlapping)
    crossing it: a decode stall that outlasts the window still counts. Each stream's first gap is
    left out (it spans the prefill -> decode handoff, not a decode step)."""
    gaps = []
    for arrivals in streams:
        times = [at for at, n in arrivals if n > 0][1:]
        for a, b in itertools.pairwise(times):
            if (b > lo and a < hi) if overlapping else (a >= lo and b <= hi):
                gaps.append((b - a) * 1e3)
    return gaps


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def itl_during_prefill(url: str, codec, long_tokens: int, timeout_s: float) -> dict:
    """ITL of ITL_STREAMS running streams over a baseline window, then while one `long_tokens`
    prompt prefills (from its send until its first token)."""
    shared = text_prompt(codec, ITL_PROMPT_TOKENS)
    long_text = f"prefill{long_tokens} " + text_prompt(codec, long_tokens)  # tokenized before the clock runs
    stop = threading.Event()
    live: list[list] = [[] for _ in range(ITL_STREAMS)]
    streams = Streams([lambda i=i: stream_arrivals(url, f"itl{i} " + shared, ITL_STREAM_TOKENS, stop=stop,
                                                   arrivals=live[i]) for i in range(ITL_STREAMS)])
    try:
        deadline = time.perf_counter() + 600
        while not all(live):
            if streams.any_done() or time.perf_counter() > deadline:
                raise RuntimeError("the ITL streams did not all start")
            time.sleep(0.01)
        baseline_lo = max(arrivals[0][0] for arrivals in live) + ITL_SETTLE_S
        time.sleep(ITL_SETTLE_S + ITL_BASELINE_S)
        sent, long_arrivals = stream_arrivals(url, long_text, 2, timeout_s=timeout_s)
        first = long_arrivals[0][0]
    finally:
        stop.set()
    streams.results()
    baseline = _gaps_ms(live, baseline_lo, sent, overlapping=False)
    during = _gaps_ms(live, sent, first, overlapping=True)
    out = {"prompt_tokens": long_tokens, "streams": ITL_STREAMS, "stream_prompt_tokens": ITL_PROMPT_TOKENS,
           "baseline_p50_ms": _percentile(baseline, 50), "baseline_p99_ms": _percentile(baseline, 99),
           "during_p50_ms": _percentile(during, 50), "during_p99_ms": _percentile(during, 99),
           "baseline_gaps": len(baseline), "during_gaps": len(during), "prefill_ttft_ms": (first - sent) * 1e3,
           # False: a stream ended before the long prompt's first token, so part of the prefill went unwatched
           "streams_outlasted_prefill": all(arrivals[-1][0] >= first for arrivals in live)}
    p99, base = out["during_p99_ms"], out["baseline_p99_ms"]
    out["ratio_p99"] = p99 / base if p99 is not None and base else None
    return out


def prefill_estimate_s(ttft: dict[int, float], tokens: int) -> float:
    """Seconds a `tokens` prompt may take, scaled from the longest prompt timed so far: the cost per
    token grows with the context (the compressed layers' scans), taken as (tokens / timed)^1.5."""
    timed, seconds = max(ttft.items())
    return seconds * (tokens / timed) ** 1.5


def _patience_s(estimate_s: float) -> float:
    """How long a long prompt may go without a response: a stalled one must not take the time the
    in-process half needs (a command on the device machine gets 600 s)."""
    return min(600.0, 2 * estimate_s + 60)


def not_measured() -> dict:
    """What `measure` returns, every figure missing (--no-triton)."""
    return {"start_s": None, "first_request_s": None, "ttft": {}, "streams": {}, "itl": None, "long": None,
            "gpu_memory": None, "errors": {}}


def _optional(out: dict, what: str, run):
    """`run()`, or None with the error kept in out["errors"]: a failed long prompt (the server's limits
    at a million tokens) should not cost the figures measured before it and the in-process half."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        cause = e.__cause__ or e
        out["errors"][what] = f"{type(cause).__name__}: {cause}"
        print(f"{what} failed: {out['errors'][what]}", file=sys.stderr)
        return None


def measure(args, codec, layout, time_left) -> dict:
    """Everything via Triton; `time_left(seconds, what)` says whether an optional part still fits."""
    serve, url, start_s = start_server(args.model, args.device, Path("runs/bench_e2e"), server_args(args, layout))
    split = [line.split("GPU", 1)[1].strip() for line in serve.banner.splitlines() if line.startswith("  GPU ")]
    out = not_measured() | {"start_s": start_s, "gpu_memory": split[0] if split else None}
    try:
        first = args.prompts[0]
        out["first_request_s"] = ttft_s(url, "first " + text_prompt(codec, first))
        out["ttft"] = {n: ttft_s(url, f"t{n} " + text_prompt(codec, n)) for n in args.prompts}
        for k, (streams, context, tokens) in enumerate(args.served_streams):
            shared = text_prompt(codec, context)
            prompts = [f"c{k}s{i} " + shared for i in range(streams)]  # no prefix hits, within or across configurations
            before = server_metrics.scrape(serve.metrics_url)
            got = concurrent_streams(url, prompts, tokens)
            time.sleep(0.3)  # decode publishes its counters every 0.1 s
            got["server"] = server_metrics.model_costs(before, server_metrics.scrape(serve.metrics_url))
            out["streams"][(streams, context, tokens)] = got
        timed = dict(out["ttft"])  # the prompts timed so far, for the long parts' estimates
        if args.itl_long:
            estimate = prefill_estimate_s(timed, args.itl_long)
            if time_left(estimate + ITL_BASELINE_S + 30, "the ITL-during-prefill probe"):
                out["itl"] = _optional(out, "itl_during_prefill",
                                       lambda: itl_during_prefill(url, codec, args.itl_long, _patience_s(estimate)))
            if out["itl"] is not None:
                timed[args.itl_long] = out["itl"]["prefill_ttft_ms"] / 1e3
        if args.served_long:
            estimate = prefill_estimate_s(timed, args.served_long)
            if time_left(estimate + 30, "the long served prompt"):
                out["long"] = _optional(out, "long_prompt",
                                        lambda: long_prompt(url, codec, args.served_long, _patience_s(estimate)))
    finally:
        serve.terminate()
        serve.wait(180)
    return out
