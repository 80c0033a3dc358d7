"""Continuous batching for the decode stage: every active request advances one token per step.

Threads: `submit` / `cancel` are called from Triton's execute and sender threads; the loop runs on
its own thread and hands finished chunks to `sink`, which must only enqueue (the adapter's
sender thread does the slow IPC), so the model never waits on a client.

The step itself is `DecodeRunner`'s: a request takes a row when it joins (at most `max_batch`
rows; further requests wait, holding nothing) and gives it back when it ends; every step runs all
rows (one CUDA graph replay on a GPU) and reads the sampled tokens back once.

On a GPU the loop runs one step ahead (`lookahead`): step N is launched before the host reads step
N-1's tokens, so detokenization, stop checks and admissions overlap the GPU's work instead of
adding to every step. A request that ended at N-1 still has its row in step N; that step's token for
it is dropped, and its one extra position lies within its reservation (prompt + max_tokens).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..decode_runner import DecodeRunner
from ..kv_cache.paged_cache import PagedCache
from ..kv_cache.storage import SequenceState
from ..model.transformer import Transformer
from ..sampler import SamplingParams
from ..tokenizer import TextCodec
from . import gpu_memory
from .handoff import StateHeader, import_state
from .request import RequestConfig
from .streams import on_stream
from .text_state import OutputChunk, TextState

log = logging.getLogger(__name__)

NO_ROOM_MESSAGE = "server is full: the decode queue is at its limit; try again later"
SHUTDOWN_MESSAGE = "server is shutting down; try again later"
TOO_BIG_MESSAGE = ("the request needs more KV cache than the decode pool holds (raise --kv-cache-gib, or "
                   "--gpu-memory-utilization when it is sized from GPU memory, or lower max_tokens)")
EngineError = tuple[str, str]  # (Triton error code name, message)
Sink = Callable[[int, OutputChunk | None, EngineError | None], None]


@dataclass(frozen=True)
class Arrival:
    """A request handed over by prefill: its config, first sampled token and cache state."""

    rid: int
    config: RequestConfig
    first_token: int
    header: StateHeader
    payload: torch.Tensor


@dataclass
class Active:
    rid: int
    config: RequestConfig
    params: SamplingParams  # built (and validated) once, not at every step
    seq: SequenceState
    text: TextState
    row: int = -1  # its row in the runner while decoding
    first_token_time: float = field(default_factory=time.time)


class Timing(NamedTuple):
    """One finished request, for the latency histograms."""

    ttft_s: float
    tpot_s: float | None
    e2e_s: float


@dataclass
class EngineStats:
    steps: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


def measure_decode_memory(model: Transformer, kv_format: str, max_batch: int, max_model_len: int, fraction: float,
                          cuda_graphs: bool = True) -> gpu_memory.MemorySplit:
    """The KV budget of decode's GPU share: a throwaway runner on a one-request pool captures the
    graphs at every bucket (so the graph pool and the kernels' autotuning are in the peak), then is
    dropped; the real engine captures again on the real pool, with every kernel already tuned."""
    weights = gpu_memory.start_measuring(model.device)
    probe = PagedCache.for_requests(model.cfg, model.dtype, model.device, 1, max_model_len, kv_format=kv_format)
    probe_bytes = probe.storage.nbytes()
    runner = DecodeRunner(model, probe.storage, max_batch, max_model_len, frozenset(model.cfg.eos_token_ids),
                          cuda_graphs=cuda_graphs)
    if not runner.capture():  # graphs off: one eager step of the widest batch makes the peak
        runner.logits(max_batch)
    del runner, probe
    gc.collect()
    return gpu_memory.split_after_warm_up("decode", model.device, fraction, weights, probe_bytes)


class DecodeEngine:
    def __init__(self, model: Transformer, cache: PagedCache, codec: TextCodec, sink: Sink, max_batch: int = 64,
                 max_waiting: int = 256, max_model_len: int | None = None, cuda_graphs: bool = True,
                 lookahead: bool | None = None, stream: torch.cuda.Stream | None = None):
        self.model, self.cache, self.codec, self.sink = model, cache, codec, sink
        self.stream = stream  # where the loop queues its steps (None: the device's current stream)
        self.storage = cache.storage
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.eos = frozenset(model.cfg.eos_token_ids)
        self.runner = DecodeRunner(model, self.storage, max_batch, max_model_len or model.cfg.max_position_embeddings,
                                   self.eos, cuda_graphs=cuda_graphs)
        self.row_rids: list[int] = []  # rid of each live runner row
        self.lookahead = model.device.type == "cuda" if lookahead is None else lookahead
        self._launched: tuple[list[int], torch.Tensor, torch.cuda.Event | None] | None = None  # step not yet read
        self._pinned = ([torch.empty(max_batch, dtype=torch.int64, pin_memory=True) for _ in range(2)]
                        if self.lookahead and model.device.type == "cuda" else [])
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        # admitted in arrival order once the pools can hold them; beyond max_waiting: UNAVAILABLE
        self.waiting: deque[Arrival] = deque()
        self.active: dict[int, Active] = {}
        self.cancel_requests: set[int] = set()
        self.stats = EngineStats()
        self.timings: deque[Timing] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self.drained = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dsv4-decode-loop", daemon=True)

    def start(self) -> float:
        """Capture the decode graphs (GPU), then start the loop; returns the capture's seconds."""
        seconds = self.runner.capture()
        self._thread.start()
        return seconds

    def submit(self, arrival: Arrival) -> None:
        self.arrivals.put(arrival)
        self._wake.set()

    def cancel(self, rid: int) -> None:
        with self._lock:
            self.cancel_requests.add(rid)
        self._wake.set()

    def drain(self, grace_s: float) -> threading.Event:
        """Stop admitting; let active requests finish for `grace_s`, then end them with an error.

        Returns an event set once nothing is active or waiting.
        """
        self._drain_deadline = time.monotonic() + grace_s
        self._wake.set()
        return self.drained

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def held_requests(self) -> int:
        return len(self.active)

    def _loop(self) -> None:
        with on_stream(self.stream):
            self._run()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # nothing may end this loop but stop(): a dead loop would leave every stream hanging
                self._admit()
                self._apply_cancels()
                if self._drain_deadline is not None:
                    self._drain_step()
                if not self.active and self._launched is None:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if self.row_rids:
                    self._step()
                else:  # the last rows ended with the step still in flight: read it (its tokens go nowhere)
                    self._read_launched()
            except Exception as exc:  # a failed step must not leave requests hanging or blocks held
                log.exception("decode step failed")
                self._launched = None
                for rid in list(self.active):
                    self._finish(rid, None, ("INTERNAL", f"decode step failed: {exc}"))
        for rid in list(self.active):
            self._finish(rid, self.active[rid].text.cancel(), None)
        for arrival in self.waiting:
            self.sink(arrival.rid, None, ("UNAVAILABLE", "server is stopping"))
        self.waiting.clear()

    def _drain_step(self) -> None:
        for arrival in self.waiting:
            self.sink(arrival.rid, None, ("UNAVAILABLE", SHUTDOWN_MESSAGE))
        self.waiting.clear()
        if time.monotonic() >= self._drain_deadline:
            for rid, entry in list(self.active.items()):
                if entry.config.stream:
                    # a normal last chunk: an error after chunks leaves Triton 2.51's ensemble request
                    # in flight forever when stream_guard steps are still pending
                    self._finish(rid, entry.text.cut(), None)
                else:
                    self._finish(rid, None, ("UNAVAILABLE", f"{SHUTDOWN_MESSAGE} (generation was cut short)"))
        if not self.active and self.arrivals.empty():
            self.drained.set()

    def waiting_requests(self) -> int:
        return len(self.waiting) + self.arrivals.qsize()

    def _admit(self) -> None:
        while True:
            try:
                arrival = self.arrivals.get_nowait()
            except queue.Empty:
                break
            if self._drain_deadline is not None:
                self.sink(arrival.rid, None, ("UNAVAILABLE", SHUTDOWN_MESSAGE))
            elif len(self.waiting) >= self.max_waiting:
                self.sink(arrival.rid, None, ("UNAVAILABLE", NO_ROOM_MESSAGE))
            else:
                self.waiting.append(arrival)
        while self.waiting and len(self.active) < self.max_batch:
            arrival = self.waiting[0]
            total = arrival.config.num_input_tokens + arrival.config.max_tokens
            if not self.cache.can_admit(total):
                if not self.active:  # nothing will ever free room for it
                    self.waiting.popleft()
                    self.sink(arrival.rid, None, ("UNAVAILABLE", TOO_BIG_MESSAGE))
                    continue
                return
            self.waiting.popleft()
            self._start(arrival, total)

    def _start(self, arrival: Arrival, total: int) -> None:
        try:
            seq = self.cache.admit(str(arrival.rid), total)
        except Exception as exc:  # this request only (a replicated cache whose ranks are gone raises here)
            self.sink(arrival.rid, None, ("INTERNAL", f"decode could not reserve the request's cache: {exc}"))
            return
        if arrival.payload.is_cuda:  # made on another stream: its memory must outlive this stream's copy
            arrival.payload.record_stream(torch.cuda.current_stream(arrival.payload.device))
        try:
            self._import_state(str(arrival.rid), seq, arrival.header, arrival.payload)
        except Exception as exc:
            self.cache.release(str(arrival.rid))
            self.sink(arrival.rid, None, ("INTERNAL", f"could not import the request's cache state: {exc}"))
            return
        config = arrival.config
        entry = Active(arrival.rid, config, config.sampling(), seq, TextState(config, self.codec, self.eos))
        self.active[arrival.rid] = entry
        self.stats.prompt_tokens += config.num_input_tokens
        self._accept(entry, arrival.first_token)
        if arrival.rid in self.active:  # not already finished by its first token
            try:
                entry.row = self.runner.add(seq, arrival.first_token, entry.params, config.seed,
                                            len(entry.text.generated), config.min_tokens)
            except Exception as exc:  # this request only: the others keep decoding
                log.exception("decode could not take request %s", arrival.rid)
                self._finish(arrival.rid, None, ("INTERNAL", f"decode could not start the request: {exc}"))
                return
            self.row_rids.append(arrival.rid)

    def _import_state(self, rid: str, seq: SequenceState, header: StateHeader, payload: torch.Tensor) -> None:
        """Unpack a prefilled state into `seq`'s blocks (a replicated engine also sends it to its ranks)."""
        import_state(self.storage, seq, header, payload)

    def _apply_cancels(self) -> None:
        with self._lock:
            pending, self.cancel_requests = self.cancel_requests, set()
        for rid in pending:
            if rid in self.active:
                self.stats.cancelled += 1
                self._finish(rid, self.active[rid].text.cancel(), None)
                continue
            waiting = next((a for a in self.waiting if a.rid == rid), None)
            if waiting is not None:
                self.waiting.remove(waiting)
                self.stats.cancelled += 1
                self.sink(rid, OutputChunk("", [], "cancelled", waiting.config.num_input_tokens, 0), None)

    def _accept(self, entry: Active, token: int) -> None:
        chunk = entry.text.push(token)
        if chunk is None:
            return
        if chunk.final:
            self._finish(entry.rid, chunk, None)
        else:
            self.sink(entry.rid, chunk, None)

    def _step(self) -> None:
        rids = list(self.row_rids)
        tokens = self.runner.step()
        self.stats.steps += 1
        if not self.lookahead:
            self._accept_tokens(rids, tokens.tolist())  # the step's one wait for the device
            return
        done = None
        if tokens.is_cuda:  # into one of two pinned buffers: the copy is queued behind the step
            host = self._pinned[self.stats.steps % 2][: tokens.numel()]
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = tokens
        self._read_launched()  # the previous step's tokens, while this one runs
        self._launched = (rids, host, done)

    def _read_launched(self) -> None:
        if self._launched is None:
            return
        (rids, host, done), self._launched = self._launched, None
        if done is not None:
            done.synchronize()  # releases the GIL: the sender thread runs meanwhile
        self._accept_tokens(rids, host.tolist())

    def _accept_tokens(self, rids: list[int], tokens: list[int]) -> None:
        for rid, token in zip(rids, tokens):
            entry = self.active.get(rid)
            if entry is not None:  # None: it ended (or was cancelled) after this step was launched
                self._accept(entry, int(token))

    def _record(self, entry: Active) -> None:
        now, n = time.time(), len(entry.text.generated)
        arrival = entry.config.arrival_time or entry.first_token_time
        tpot = (now - entry.first_token_time) / (n - 1) if n > 1 else None
        self.timings.append(Timing(entry.first_token_time - arrival, tpot, now - arrival))

    def _finish(self, rid: int, chunk: OutputChunk | None, error: EngineError | None) -> None:
        entry = self.active.pop(rid, None)
        if entry is not None:
            if entry.row >= 0:
                self._free_row(entry.row)
            self.cache.release(str(rid))
            self.stats.finished += 1
            self.stats.generation_tokens += len(entry.text.generated)
            self._record(entry)
        self.sink(rid, chunk, error)

    def _free_row(self, row: int) -> None:
        moved = self.runner.remove(row)
        last = self.row_rids.pop()
        if moved is not None:  # the last row's request now sits in the freed row
            self.row_rids[row] = last
            self.active[last].row = row
