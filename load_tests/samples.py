"""Raw per-request samples, kept exactly (Locust rounds its own percentiles), one JSON per line.

Fields of one line:

- ``t0``: wall-clock send time (epoch seconds); ``t_first`` / ``t_last``: first chunk carrying
  tokens / last response (epoch seconds, measured with a monotonic clock from ``t0``; None if
  none came);
- ``chunk_times``: arrival of every chunk, seconds after ``t0``; ``chunk_tokens``: token ids in
  each chunk;
- ``num_output_tokens``: the server's cumulative count from the last chunk (else the ids
  counted); ``num_input_tokens``: as reported by the server;
- ``status``: "ok", "cancelled" (the client abandoned it on purpose) or "error" (with
  ``error`` and ``error_type``);
- ``run_id``, ``scenario``, ``protocol``, ``request_name``, ``user_id``, ``users`` (users
  running when it was sent).
"""

from __future__ import annotations

import glob
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsv4.client import StreamChunk

__all__ = ["RawSample", "SampleWriter", "Trace", "read_samples"]


@dataclass
class RawSample:
    run_id: str
    scenario: str
    protocol: str
    request_name: str
    user_id: int
    users: int
    t0: float
    t_first: float | None
    t_last: float | None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    num_input_tokens: int | None = None
    num_output_tokens: int = 0
    finish_reason: str = ""
    status: str = "ok"
    error: str | None = None
    error_type: str | None = None

    def to_json(self) -> str:
        d = asdict(self)
        d["chunk_times"] = [round(t, 6) for t in self.chunk_times]
        return json.dumps(d, separators=(",", ":"))


class Trace:
    """Timing of one request as its chunks arrive (perf_counter based, anchored to wall time)."""

    def __init__(self, t0_wall: float, t0_perf: float) -> None:
        self.t0_wall = t0_wall
        self.t0_perf = t0_perf
        self.chunk_times: list[float] = []
        self.chunk_tokens: list[int] = []
        self.first_rel: float | None = None
        self.last_rel: float | None = None
        self.num_input_tokens: int | None = None
        self.server_output_tokens: int | None = None
        self.finish_reason = ""
        self.text_bytes = 0

    def add(self, chunk: StreamChunk) -> None:
        rel = chunk.arrival_s - self.t0_perf
        self.chunk_times.append(rel)
        self.chunk_tokens.append(len(chunk.token_ids))
        self.last_rel = rel
        if self.first_rel is None and chunk.has_tokens:
            self.first_rel = rel
        if chunk.num_input_tokens is not None:
            self.num_input_tokens = chunk.num_input_tokens
        if chunk.num_output_tokens is not None:
            self.server_output_tokens = chunk.num_output_tokens
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        self.text_bytes += len(chunk.text.encode("utf-8"))

    @property
    def num_output_tokens(self) -> int:
        return self.server_output_tokens if self.server_output_tokens is not None else sum(self.chunk_tokens)

    def sample(self, *, end_perf: float, status: str, error: BaseException | None, **labels: Any) -> RawSample:
        last = self.last_rel if status == "ok" and self.last_rel is not None else end_perf - self.t0_perf
        return RawSample(
            t0=self.t0_wall,
            t_first=None if self.first_rel is None else self.t0_wall + self.first_rel,
            t_last=self.t0_wall + last,
            chunk_times=self.chunk_times,
            chunk_tokens=self.chunk_tokens,
            num_input_tokens=self.num_input_tokens,
            num_output_tokens=self.num_output_tokens,
            finish_reason="cancelled" if status == "cancelled" else self.finish_reason,
            status=status,
            error=None if error is None else str(error),
            error_type=None if error is None else type(error).__name__,
            **labels,
        )


class SampleWriter:
    """Appends samples to a JSONL file, opened on first write; safe to share between greenlets/threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.count = 0
        self._file: Any = None
        self._lock = threading.Lock()

    def write(self, sample: RawSample) -> None:
        line = sample.to_json() + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_samples(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Load samples from JSONL files (glob patterns allowed); each gets ``source`` = its file."""
    samples: list[dict[str, Any]] = []
    for pattern in paths:
        matches = sorted(glob.glob(str(pattern))) or [str(pattern)]
        for name in matches:
            with open(name, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        obj = json.loads(line)
                        obj.setdefault("source", name)
                        samples.append(obj)
    return samples
