"""Prefill and decode in one process: one copy of the weights, one CUDA context, the cache state
handed over in device memory instead of through Triton.

Two stages in two processes time-slice one GPU: a prefill pass beside a running decode ran 2-5x
slower, and every decode step waited for prefill's time slice. Here the prefill engine and the
decode engine are two loops (threads) of one process on two streams (`streams.stage_streams`):
decode's at high priority, prefill's at low, so a decode step is scheduled ahead of prefill's
blocks as SMs free up and prefill fills whatever decode leaves idle.

A prompt goes: `submit` -> prefill engine (batched, chunked, prefix-cached as in its own stage)
-> its exported state -> the decode engine's arrivals (`import_state`, a device-to-device copy) ->
streamed chunks to `sink`, exactly as decode sends them. Errors before the first token go to
`sink` too, so the caller sees one stream of results per request id.
"""

from __future__ import annotations

import threading

import numpy as np

from . import gpu_memory
from .decode_engine import Arrival, DecodeEngine, Sink, measure_decode_memory
from .prefill_engine import PrefillEngine, PrefillSettings
from .prefill_stage import PrefillResult, PrefillStage
from .request import RequestConfig

CANCELLED_MESSAGE = "cancelled before its first token"


def measure_memory(stage: PrefillStage, settings: PrefillSettings, kv_format: str, max_batch: int,
                   max_model_len: int, fraction: float, prefill_kv_share: float,
                   cuda_graphs: bool = True) -> gpu_memory.MemorySplit:
    """Warm both stages up on the shared weights and split `fraction` of the GPU: weights once,
    prefill's and decode's warm-up peaks added (they run at the same time), the KV for both pools."""
    device = stage.model.device
    weights = gpu_memory.start_measuring(device)
    stage.warm_up(settings.chunk, settings.widest_pass)
    prefill_working = gpu_memory.warm_up_peak(device, weights)
    decode = measure_decode_memory(stage.model, kv_format, max_batch, max_model_len, fraction, cuda_graphs)
    return decode.shared_with_prefill(prefill_working, prefill_kv_share)


class Colocated:
    """The prefill engine feeding the decode engine in-process; `sink` gets decode's results and
    prefill's errors. `cancel` reaches a request in either stage."""

    def __init__(self, stage: PrefillStage, settings: PrefillSettings, decode: DecodeEngine, sink: Sink,
                 prefill_stream=None):
        self.decode, self.sink = decode, sink
        self.prefill = PrefillEngine(stage, settings, self._handoff, stream=prefill_stream)
        self._configs: dict[int, RequestConfig] = {}  # requests in prefill
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> float:
        """Capture decode's graphs, start both loops; returns the capture's seconds."""
        seconds = self.decode.start()
        self.prefill.start()
        return seconds

    def stop(self, timeout: float = 10.0) -> None:
        self.prefill.stop(timeout)  # prompts still in prefill are answered UNAVAILABLE
        self.decode.stop(timeout)

    def submit(self, rid: int, ids: np.ndarray, config: RequestConfig) -> None:
        with self._lock:
            self._configs[rid] = config
        self.prefill.submit(rid, ids, config, lambda: rid in self._cancelled)

    def cancel(self, rid: int) -> None:
        with self._lock:
            if rid in self._configs:  # still in prefill: its loop drops it at the next step
                self._cancelled.add(rid)
                return
        self.decode.cancel(rid)

    def held_requests(self) -> int:
        """Requests in prefill, running or waiting (decode's own count is `decode.held_requests`)."""
        return self.prefill.held_requests()

    def _handoff(self, rid: int, result: PrefillResult | None, error) -> None:
        with self._lock:
            config = self._configs.pop(rid, None)
            cancelled = rid in self._cancelled
            self._cancelled.discard(rid)
        if result is None:
            self.sink(rid, None, error)
        elif cancelled or config is None:  # cancelled while its last chunk ran
            self.sink(rid, None, ("CANCELLED", CANCELLED_MESSAGE))
        else:
            self.decode.submit(Arrival(rid, config, result.first_token, result.header, result.payload))
