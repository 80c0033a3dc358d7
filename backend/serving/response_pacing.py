"""Flow control between decode's sender and stream_guard, the ensemble step every streamed chunk
passes through.

stream_guard is one Python-backend instance and costs a few hundred microseconds per chunk (an IPC
round trip in and out of its stub), so it carries a few thousand chunks a second. Decode can make
tens of thousands of tokens a second; sent one response per token, the surplus queues in front of
stream_guard and every stream's latency grows without bound. So stream_guard counts the chunks it
has passed on in a shared 8-byte mapping, decode's sender counts what it sent, and the sender keeps
at most `limit` chunks in flight between them. Chunks that wait merge (`text_state.coalesce`): a
stream under load gets fewer, larger responses, and no token waits longer than the path needs.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

COUNTER = struct.Struct("<Q")
SHM_DIR = Path("/dev/shm")
IN_FLIGHT_LIMIT = 16  # queued chunks cost ~0.3 ms each at stream_guard: a few ms of latency, never idle
IDLE_RESYNC_S = 0.05  # nothing passed on for this long while chunks seem in flight: they never will be


def counter_path(server_pid: int) -> Path:
    """Where the stages of one tritonserver (their common parent) meet."""
    return SHM_DIR / f"dsv4-stream-guard-{server_pid}"


class ProgressCounter:
    """stream_guard's side: a counter of the chunks it has passed on, readable by other processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "w+b") as f:
            f.write(bytes(COUNTER.size))
            f.flush()
            self._map = mmap.mmap(f.fileno(), COUNTER.size)
        self.value = 0

    def add(self, n: int) -> None:
        self.value += n
        COUNTER.pack_into(self._map, 0, self.value)

    def close(self) -> None:
        self._map.close()
        self.path.unlink(missing_ok=True)


def counter_reader(path: Path) -> Callable[[], int | None]:
    """decode's side: a function reading the counter, or None until stream_guard has created it."""
    state: dict[str, mmap.mmap] = {}

    def read() -> int | None:
        if "map" not in state:
            try:
                with open(path, "rb") as f:
                    state["map"] = mmap.mmap(f.fileno(), COUNTER.size, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                return None
        return COUNTER.unpack_from(state["map"], 0)[0]

    return read


class Pacer:
    """How many more chunks decode may send now. `read_done()` is stream_guard's counter (None: no
    counter, no limit). Chunks whose ensemble request ended early (cancelled, failed) never reach
    stream_guard; once it has passed nothing on for `idle_resync_s` they are written off."""

    def __init__(self, read_done: Callable[[], int | None], limit: int = IN_FLIGHT_LIMIT,
                 idle_resync_s: float = IDLE_RESYNC_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.read_done, self.limit, self.idle_resync_s, self.clock = read_done, limit, idle_resync_s, clock
        self.sent = 0
        self._base: tuple[int, int] | None = None  # (counter, sent) when the counter was first read
        self._written_off = 0
        self._last_done, self._last_change = -1, clock()

    def in_flight(self) -> int | None:
        done = self.read_done()
        if done is None:
            return None
        if self._base is None:
            self._base = (done, self.sent)
        done -= self._base[0]
        now = self.clock()
        if done != self._last_done:
            self._last_done, self._last_change = done, now
        waiting = self.sent - self._base[1] - self._written_off - done
        if waiting > 0 and now - self._last_change >= self.idle_resync_s:
            self._written_off += waiting
            self._last_change = now
            waiting = 0
        return max(waiting, 0)

    def room(self) -> int | None:
        """Chunks that may be sent now; None: no limit."""
        waiting = self.in_flight()
        return None if waiting is None else max(self.limit - waiting, 0)

    def record(self, n: int) -> None:
        self.sent += n


def server_pid() -> int:
    """The stub's parent: the tritonserver process both stages run under."""
    return os.getppid()
