"""Prefill is scheduled, not queued: prompts that wait together are prefilled together.

Threads: `submit` is called from Triton's execute thread; the loop runs on its own thread and
hands each result to `sink`, which must only enqueue (the adapter's sender thread does the IPC).

Each step takes one chunk of every running prompt that fits a token budget and runs them in one
pass (`PrefillStage.step`): on the kernel path one launch of each kernel per layer for all of them.
A prompt's chunks end where they would in-process (every `chunk` tokens from its start or cache
point), so its cache state is the one a lone run writes. Prompts that have run the fewest chunks
go first, so an arrival starts within one step even beside a long prompt, and a long prompt
still gets a chunk whenever the budget has room.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .decode_engine import SHUTDOWN_MESSAGE, EngineError
from .prefill_stage import PrefillJob, PrefillResult, PrefillStage
from .request import RequestConfig
from .streams import on_stream

log = logging.getLogger(__name__)

NO_ROOM_MESSAGE = "server is full: the prefill queue is at its limit; try again later"
TOO_BIG_MESSAGE = ("the prompt needs more KV cache than the prefill pool holds "
                   "(raise --prefix-cache-gib, or --gpu-memory-utilization when it is sized from GPU memory)")
Sink = Callable[[int, PrefillResult | None, EngineError | None], None]


@dataclass(frozen=True)
class PrefillSettings:
    chunk: int  # most tokens of one prompt per step: the in-process chunk
    token_budget: int  # most tokens per step over all prompts (>= chunk)
    max_prompts: int  # most prompts in one step (the prefill cache's request slots)
    max_waiting: int = 1024
    # when idle, how long the first arrival waits for companions: requests sent together reach
    # this stub one IPC round trip apart, and a step started at once would take only the first
    gather_s: float = 0.002

    def __post_init__(self):
        if self.chunk < 1 or self.token_budget < self.chunk or self.max_prompts < 1 or self.max_waiting < 0:
            raise ValueError(f"prefill settings need chunk >= 1, token_budget >= chunk and max_prompts >= 1: {self}")

    @property
    def widest_pass(self) -> int:
        """Whole chunks the largest step can run together: the warm-up's shape for the memory peak."""
        return max(1, min(self.max_prompts, self.token_budget // self.chunk))


@dataclass
class Pending:
    rid: int
    ids: np.ndarray
    config: RequestConfig
    should_stop: Callable[[], bool]
    job: PrefillJob | None = None


class PrefillEngine:
    def __init__(self, stage: PrefillStage, settings: PrefillSettings, sink: Sink,
                 stream: torch.cuda.Stream | None = None):
        self.stage, self.settings, self.sink = stage, settings, sink
        self.stream = stream  # where the loop queues its passes (None: the device's current stream)
        self.arrivals: queue.Queue[Pending] = queue.Queue()
        self.waiting: deque[Pending] = deque()  # not yet admitted to the cache, in arrival order
        self.running: list[Pending] = []  # admitted, in arrival order
        self.step_sizes: deque[tuple[int, int]] = deque(maxlen=10_000)  # (prompts, tokens) per step
        self.step_seconds: deque[float] = deque(maxlen=10_000)  # each step's wall time, its results handed on
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dsv4-prefill-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, rid: int, ids: np.ndarray, config: RequestConfig, should_stop: Callable[[], bool]) -> None:
        self.arrivals.put(Pending(rid, ids, config, should_stop))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def held_requests(self) -> int:
        return len(self.running) + len(self.waiting) + self.arrivals.qsize()

    def _loop(self) -> None:
        with on_stream(self.stream):
            self._run()

    def _run(self) -> None:
        while not self._stop.is_set():
            was_idle = not (self.running or self.waiting)
            self._take_arrivals()
            if was_idle and self.waiting and self.settings.gather_s > 0:
                time.sleep(self.settings.gather_s)
                self._take_arrivals()
            self._drop_cancelled()
            self._admit()
            if not self.running:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._step()
        for p in [*self.running, *self.waiting]:
            self._end(p, None, ("UNAVAILABLE", SHUTDOWN_MESSAGE))
        self.running, self.waiting = [], deque()
        self._take_arrivals(refuse=True)

    def _take_arrivals(self, refuse: bool = False) -> None:
        while True:
            try:
                p = self.arrivals.get_nowait()
            except queue.Empty:
                return
            if refuse or self._stop.is_set():
                self.sink(p.rid, None, ("UNAVAILABLE", SHUTDOWN_MESSAGE))
            elif len(self.waiting) >= self.settings.max_waiting:
                self.sink(p.rid, None, ("UNAVAILABLE", NO_ROOM_MESSAGE))
            else:
                self.waiting.append(p)

    def _drop_cancelled(self) -> None:
        for group in (self.running, self.waiting):
            for p in [p for p in group if _cancelled(p)]:
                group.remove(p)
                done = p.job.seq.position if p.job is not None else 0
                self._end(p, None, ("CANCELLED", f"prefill cancelled after {done} of {len(p.ids)} prompt tokens"))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.settings.max_prompts:
            p = self.waiting[0]
            try:
                p.job = self.stage.begin(p.ids, p.config)
            except Exception as exc:  # a prompt the stage refuses must not stop the loop
                self.waiting.popleft()
                self.sink(p.rid, None, ("INTERNAL", f"prefill could not start: {exc}"))
                continue
            if p.job is None:  # the cache is full: wait for running prompts to leave
                if not self.running:  # nothing will ever free room for it
                    self.waiting.popleft()
                    self.sink(p.rid, None, ("UNAVAILABLE", TOO_BIG_MESSAGE))
                    continue
                return
            self.waiting.popleft()
            self.running.append(p)

    def plan(self) -> list[tuple[Pending, int]]:
        """This step's chunks: fewest chunks run first (then arrival order), whole chunks within the budget."""
        budget, plan = self.settings.token_budget, []
        for p in sorted(self.running, key=lambda p: p.job.steps):  # stable: arrival order among equals
            end = p.job.next_end(self.settings.chunk)
            n = end - p.job.seq.position
            if n <= budget:
                plan.append((p, end))
                budget -= n
        return plan

    def _step(self) -> None:
        plan = self.plan()
        tokens = sum(end - p.job.seq.position for p, end in plan)
        started = time.perf_counter()
        try:
            finished = self.stage.step([(p.job, end) for p, end in plan])
        except Exception as exc:  # a failed pass must not leave prompts hanging or blocks held
            log.exception("prefill step failed")
            for p, _ in plan:
                self.running.remove(p)
                self._end(p, None, ("INTERNAL", f"prefill failed: {exc}"))
            return
        self.step_sizes.append((len(plan), tokens))
        by_job = {id(job): result for job, result in finished}
        for p, _ in plan:
            result = by_job.get(id(p.job))
            if result is not None:
                self.running.remove(p)
                self.sink(p.rid, result, None)
        self.step_seconds.append(time.perf_counter() - started)

    def _end(self, p: Pending, result: PrefillResult | None, error: EngineError | None) -> None:
        if p.job is not None:
            self.stage.abort(p.job)
        self.sink(p.rid, result, error)


def _cancelled(p: Pending) -> bool:
    try:
        return bool(p.should_stop())
    except Exception:  # the client's side is gone: nobody will read the result
        return True
