"""Retries with exponential backoff and jitter, for UNAVAILABLE only.

A request is retried only when the server said UNAVAILABLE (or could not be reached) *and* no
token has been received for it yet: INVALID_ARG and every other error are final, and a stream
that already produced output is never replayed (the caller has seen part of the answer).
``sleep``, ``rand`` and ``clock`` are injectable so that the timing can be tested.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .transport import ResponseStream, Transport
from .types import GenerationRequest, GenerationResult, StreamChunk, Unavailable

__all__ = ["RetryPolicy", "RetryingStream", "RetryingTransport", "retry_call", "retry_call_async"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first try. Attempt n (1-based) that fails waits
    ``min(max_backoff_s, initial_backoff_s * multiplier**(n-1))``, scaled by a random factor in
    ``[1 - jitter, 1]``. ``max_elapsed_s`` stops retrying once that much time has passed since the
    first attempt (a wait that would cross it is not started).
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_elapsed_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")

    def should_retry(self, error: BaseException, attempt: int, *, tokens_received: bool) -> bool:
        """Whether a failure of attempt ``attempt`` (1-based) may be followed by another try."""
        return isinstance(error, Unavailable) and not tokens_received and attempt < self.max_attempts

    def backoff_s(self, attempt: int, rand: float) -> float:
        """The wait after failed attempt ``attempt``; ``rand`` is uniform in [0, 1)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * (1.0 - self.jitter * rand)

    def next_wait(self, error: BaseException, attempt: int, *, tokens_received: bool, elapsed_s: float,
                  rand: float) -> float | None:
        """The wait before the next attempt, or None to give up and raise ``error``."""
        if not self.should_retry(error, attempt, tokens_received=tokens_received):
            return None
        wait = self.backoff_s(attempt, rand)
        if self.max_elapsed_s is not None and elapsed_s + wait > self.max_elapsed_s:
            return None
        return wait


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it succeeds or the policy gives up (then its last error is raised)."""
    start = clock()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            wait = policy.next_wait(e, attempt, tokens_received=False, elapsed_s=clock() - start, rand=rand())
            if wait is None:
                raise
        sleep(wait)
        attempt += 1


async def retry_call_async(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """The asyncio form of :func:`retry_call`."""
    start = clock()
    attempt = 1
    while True:
        try:
            return await fn()
        except Exception as e:
            wait = policy.next_wait(e, attempt, tokens_received=False, elapsed_s=clock() - start, rand=rand())
            if wait is None:
                raise
        await sleep(wait)
        attempt += 1


class RetryingStream:
    """A stream that reopens the request while nothing has been received yet."""

    def __init__(self, open_stream: Callable[[], ResponseStream], policy: RetryPolicy, *,
                 sleep: Callable[[float], None], rand: Callable[[], float], clock: Callable[[], float]) -> None:
        self._open = open_stream
        self._policy = policy
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._current: ResponseStream | None = None
        self._cancelled = False
        self.attempts = 0
        self._gen = self._run()

    def _run(self) -> Iterator[StreamChunk]:
        start = self._clock()
        received = False
        while True:
            self.attempts += 1
            try:
                self._current = self._open()
                for chunk in self._current:
                    received = True
                    yield chunk
                return
            except Exception as e:
                if self._cancelled:
                    return
                wait = self._policy.next_wait(e, self.attempts, tokens_received=received,
                                              elapsed_s=self._clock() - start, rand=self._rand())
                if wait is None:
                    raise
            self._sleep(wait)
            if self._cancelled:
                return

    def __iter__(self) -> RetryingStream:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._gen)

    def cancel(self) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()


class RetryingTransport:
    """Wraps any :class:`Transport` and retries UNAVAILABLE failures per ``policy``."""

    def __init__(
        self,
        transport: Transport,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._clock = clock

    def stream(self, request: GenerationRequest) -> RetryingStream:
        return RetryingStream(lambda: self.transport.stream(request), self.policy,
                              sleep=self._sleep, rand=self._rand, clock=self._clock)

    def infer(self, request: GenerationRequest) -> GenerationResult:
        return retry_call(lambda: self.transport.infer(request), self.policy,
                          sleep=self._sleep, rand=self._rand, clock=self._clock)

    def close(self) -> None:
        self.transport.close()
