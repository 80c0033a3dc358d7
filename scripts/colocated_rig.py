"""The served engines without Triton: prefill and decode colocated in this process, as
`dsv4-serve --stage-layout colocated` runs them, with every streamed chunk timed on arrival.

Used by `profile_colocated` (where steps lose time) and by `bench_e2e` (the in-process side of a
served stream configuration: the same scheduler, so what remains between the two is Triton's).
"""

from __future__ import annotations

import queue
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


class Rig:
    """Colocated engines on one model; each request's chunks are timed as they reach the sink."""

    def __init__(self, model, chunk: int, budget: int, max_prompts: int, rows: int, max_len: int, prefill_gib: float,
                 codec: TextCodec | None = None, kv_format: str | None = None):
        streams = stage_streams(model.device)
        device = str(model.device)
        kv_format = kv_format or ("fp8" if model.device.type == "cuda" else "float")  # dsv4-serve's default
        self.stage = PrefillStage(None, device, model.dtype, max_len, int(prefill_gib * (1 << 30)), kv_format=kv_format,
                                  max_prompts=max_prompts, model=model)
        cache = PagedCache.for_requests(model.cfg, model.dtype, device, rows, max_len, kv_format=kv_format)
        self.sink: queue.Queue = queue.Queue()
        self.decode = DecodeEngine(model, cache, codec or TextCodec.load(),
                                   lambda *item: self.sink.put((time.perf_counter(), *item)),
                                   max_batch=rows, max_model_len=max_len, stream=streams.decode)
        self.colocated = Colocated(self.stage, PrefillSettings(chunk=chunk, token_budget=budget, max_prompts=max_prompts),
                                   self.decode, lambda *item: self.sink.put((time.perf_counter(), *item)), streams.prefill)
        self.stage.warm_up(chunk, self.colocated.prefill.settings.widest_pass)
        self.colocated.start()
        self.max_len = max_len
        self.times: dict[int, list[float]] = {}  # one arrival time per token
        self.arrivals: dict[int, list[tuple[float, int]]] = {}  # (arrival time, tokens) per chunk
        self.sent: dict[int, float] = {}
        self.done: set[int] = set()
        self.g = torch.Generator().manual_seed(0)
        self.vocab = model.cfg.vocab_size

    def submit(self, rid: int, n: int, max_tokens: int | None = None) -> None:
        """A prompt of n random tokens; max_tokens None: as many as its row holds (decode reserves
        prompt + max_tokens up front), for streams that run until cancelled. Every request makes
        exactly max_tokens (EOS does not end it early), as the benchmarks' clients ask."""
        max_tokens = max_tokens if max_tokens is not None else self.max_len - n - 1
        margin = min(1000, self.vocab // 8)  # away from the special tokens at both ends
        ids = torch.randint(margin, self.vocab - margin, (n,), generator=self.g).numpy().astype(np.int32)
        config = RequestConfig(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, seed=rid, stream=True,
                               num_input_tokens=n)
        self.times[rid], self.arrivals[rid], self.sent[rid] = [], [], time.perf_counter()
        self.colocated.submit(rid, ids, config)

    def pump(self, until, timeout_s: float = 600.0) -> None:
        """Read arrivals until `until()` holds."""
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("the engines did not get there in time")
            try:
                at, rid, chunk, error = self.sink.get(timeout=1.0)
            except queue.Empty:
                continue
            if error is not None:
                raise RuntimeError(f"request {rid}: {error}")
            n = len(chunk.token_ids)
            self.times[rid].extend([at] * max(1, n))
            if n:
                self.arrivals[rid].append((at, n))
            if chunk.final:
                self.done.add(rid)

    def stop(self) -> None:
        for rid in self.times:
            if rid not in self.done:
                self.colocated.cancel(rid)
        self.colocated.stop()
