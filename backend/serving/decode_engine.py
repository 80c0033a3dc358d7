"""Continuous batching for the decode stage: every active request advances one token per step.

Threads: `submit` / `cancel` are called from Triton's execute and sender threads; the loop runs on
its own thread and hands finished chunks to `sink`, which must only enqueue (the adapter's
sender thread does the slow IPC), so the model never waits on a client.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import sample_tokens
from ..kv_cache.allocator import OutOfBlocks, SimpleAllocator
from ..kv_cache.storage import KVStorage, SequenceState
from ..model.transformer import Transformer
from ..tokenizer import TextCodec
from .handoff import StateHeader, import_state
from .request import RequestConfig
from .text_state import OutputChunk, TextState

log = logging.getLogger(__name__)

NO_ROOM_MESSAGE = "the decode stage has no KV-cache room for this request; retry later"
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
    seq: SequenceState
    text: TextState
    next_token: int
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)


@dataclass
class EngineStats:
    active: int = 0
    waiting: int = 0
    steps: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class DecodeEngine:
    def __init__(self, model: Transformer, storage: KVStorage, codec: TextCodec, sink: Sink, max_batch: int = 64):
        self.model, self.storage, self.codec, self.sink = model, storage, codec, sink
        self.alloc = SimpleAllocator(storage)
        self.max_batch = max_batch
        self.eos = frozenset(model.cfg.eos_token_ids)
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        self.active: dict[int, Active] = {}
        self.cancel_requests: set[int] = set()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dsv4-decode-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, arrival: Arrival) -> None:
        self.arrivals.put(arrival)
        self._wake.set()

    def cancel(self, rid: int) -> None:
        with self._lock:
            self.cancel_requests.add(rid)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def held_requests(self) -> int:
        return len(self.active)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self._apply_cancels()
            if not self.active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:  # a failed step must not leave requests hanging or blocks held
                log.exception("decode step failed")
                for rid in list(self.active):
                    self._finish(rid, None, ("INTERNAL", f"decode step failed: {exc}"))
        for rid in list(self.active):
            self._finish(rid, self.active[rid].text.cancel(), None)

    def _admit(self) -> None:
        while True:
            try:
                arrival = self.arrivals.get_nowait()
            except queue.Empty:
                return
            config = arrival.config
            total = config.num_input_tokens + config.max_tokens
            try:
                seq = self.alloc.new_sequence(total)
            except OutOfBlocks:
                self.sink(arrival.rid, None, ("UNAVAILABLE", NO_ROOM_MESSAGE))
                continue
            try:
                import_state(self.storage, seq, arrival.header, arrival.payload)
            except Exception as exc:
                self.alloc.release(seq)
                self.sink(arrival.rid, None, ("INTERNAL", f"could not import the request's cache state: {exc}"))
                continue
            text = TextState(config, self.codec, self.eos)
            entry = Active(arrival.rid, config, seq, text, arrival.first_token)
            self.active[arrival.rid] = entry
            self.stats.prompt_tokens += config.num_input_tokens
            self._accept(entry, arrival.first_token)

    def _apply_cancels(self) -> None:
        with self._lock:
            pending, self.cancel_requests = self.cancel_requests, set()
        for rid in pending:
            if rid in self.active:
                self.stats.cancelled += 1
                self._finish(rid, self.active[rid].text.cancel(), None)

    def _accept(self, entry: Active, token: int) -> None:
        chunk = entry.text.push(token)
        entry.next_token = token
        if chunk is None:
            return
        if chunk.final:
            self._finish(entry.rid, chunk, None)
        else:
            self.sink(entry.rid, chunk, None)

    def _step(self) -> None:
        batch = list(self.active.values())[: self.max_batch]
        tokens = torch.tensor([e.next_token for e in batch], device=self.model.device)
        logits = self.model.decode(tokens, [e.seq for e in batch], self.storage)
        params = [e.config.sampling() for e in batch]
        steps = [len(e.text.generated) for e in batch]
        next_tokens = sample_tokens(logits, params, [e.config.seed for e in batch], steps, [e.text.banned for e in batch])
        self.stats.steps += 1
        for entry, token in zip(batch, next_tokens.tolist()):
            self._accept(entry, int(token))

    def _finish(self, rid: int, chunk: OutputChunk | None, error: EngineError | None) -> None:
        entry = self.active.pop(rid, None)
        if entry is not None:
            self.alloc.release(entry.seq)
            self.stats.finished += 1
            self.stats.generation_tokens += len(entry.text.generated)
        self.sink(rid, chunk, error)
