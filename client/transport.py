"""The transport interface, endpoint parsing and turning responses into chunks and results.

A transport sends one :class:`GenerationRequest` at a time and returns either a stream of
:class:`StreamChunk` (``stream``) or one :class:`GenerationResult` (``infer``). The CLI, the
retry wrapper and tests depend only on this interface.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import numpy as np

from .types import GenerationRequest, GenerationResult, StreamChunk, Timeout

__all__ = [
    "Endpoint",
    "ResponseStream",
    "ResultBuilder",
    "StreamState",
    "Transport",
    "collect",
    "request_id_of",
    "single_result",
    "timeout_of",
    "parse_url",
    "DEFAULT_GRPC_URL",
    "DEFAULT_HTTP_URL",
]

DEFAULT_GRPC_URL = "127.0.0.1:8001"
DEFAULT_HTTP_URL = "http://127.0.0.1:8000"
_DEFAULT_PORTS = {"grpc": 8001, "grpcs": 8001, "http": 8000, "https": 443}


@runtime_checkable
class ResponseStream(Protocol):
    """An iterator of chunks that can be cancelled; iteration ends after the last response."""

    def __iter__(self) -> Iterator[StreamChunk]: ...

    def __next__(self) -> StreamChunk: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    def stream(self, request: GenerationRequest) -> ResponseStream: ...

    def infer(self, request: GenerationRequest) -> GenerationResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens. ``address`` is what the transport's library wants."""

    protocol: str  # "grpc" | "http"
    host: str
    port: int
    ssl: bool = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.protocol == "grpc":
            return f"{host}:{self.port}"
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"


def parse_url(url: str | None, protocol: str | None = None) -> Endpoint:
    """Parse ``grpc://h:p``, ``http(s)://h:p``, ``grpcs://h:p`` or a bare ``h[:p]``.

    A scheme decides the protocol; ``protocol`` must then agree with it. A bare address uses
    ``protocol`` (default grpc). A missing port takes the protocol's default (8001 / 8000).
    Raises ValueError on anything else.
    """
    if protocol is not None and protocol not in ("grpc", "http"):
        raise ValueError(f"unknown protocol {protocol!r} (grpc or http)")
    if not url:
        url = DEFAULT_HTTP_URL if protocol == "http" else DEFAULT_GRPC_URL
    scheme = None
    rest = url.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        scheme = scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r} (grpc://, grpcs://, http://, https://)")
    url_protocol = None if scheme is None else ("grpc" if scheme.startswith("grpc") else "http")
    if protocol is not None and url_protocol is not None and protocol != url_protocol:
        raise ValueError(f"--protocol {protocol} does not match URL {url!r}")
    proto = url_protocol or protocol or "grpc"
    ssl = scheme in ("https", "grpcs")
    parts = urlsplit("//" + rest)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"URL {url!r} must not have a path; give host[:port] only")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}") from e
    if not host:
        raise ValueError(f"no host in {url!r}")
    if port is None:
        port = _DEFAULT_PORTS[scheme] if scheme else _DEFAULT_PORTS[proto]
    return Endpoint(proto, host, port, ssl)


class ResultBuilder:
    """Accumulates chunks of one request into a :class:`GenerationResult`."""

    def __init__(self, sent_s: float, request_id: str = "") -> None:
        self.sent_s = sent_s
        self.request_id = request_id
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.token_times: list[float] = []
        self.chunk_times: list[float] = []
        self.first_token_s: float | None = None
        self.last_s: float | None = None
        self.finish_reason = ""
        self.num_input_tokens: int | None = None
        self.num_output_tokens: int | None = None

    def add(self, chunk: StreamChunk) -> None:
        rel = chunk.arrival_s - self.sent_s
        self.chunk_times.append(rel)
        self.last_s = chunk.arrival_s
        if chunk.has_tokens and self.first_token_s is None:
            self.first_token_s = chunk.arrival_s
        self.text_parts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.token_times.extend([rel] * len(chunk.token_ids))
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.num_input_tokens is not None:
            self.num_input_tokens = chunk.num_input_tokens
        if chunk.num_output_tokens is not None:
            self.num_output_tokens = chunk.num_output_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_output_tokens if self.num_output_tokens is not None else len(self.token_ids)

    def build(self, *, end_s: float | None = None, finish_reason: str | None = None) -> GenerationResult:
        end = end_s if end_s is not None else (self.last_s if self.last_s is not None else time.perf_counter())
        return GenerationResult(
            text="".join(self.text_parts),
            token_ids=tuple(self.token_ids),
            finish_reason=finish_reason if finish_reason is not None else self.finish_reason,
            num_input_tokens=self.num_input_tokens,
            num_output_tokens=self.num_tokens,
            ttft_s=None if self.first_token_s is None else self.first_token_s - self.sent_s,
            total_s=max(0.0, end - self.sent_s),
            token_times_s=tuple(self.token_times),
            chunk_times_s=tuple(self.chunk_times),
            request_id=self.request_id,
        )


def collect(chunks: Iterable[StreamChunk], sent_s: float, request_id: str = "") -> GenerationResult:
    """Drain ``chunks`` and assemble the result (times relative to ``sent_s``)."""
    builder = ResultBuilder(sent_s, request_id)
    for chunk in chunks:
        builder.add(chunk)
    return builder.build()


def single_result(chunk: StreamChunk | None, sent_s: float, request_id: str, end_s: float | None = None) -> GenerationResult:
    """The result of a unary call: its one chunk (if the response held one)."""
    builder = ResultBuilder(sent_s, request_id)
    if chunk is not None:
        builder.add(chunk)
    return builder.build(end_s=end_s)


def request_id_of(request: GenerationRequest) -> str:
    """The caller's request id, or a fresh one."""
    return request.request_id or uuid.uuid4().hex


def timeout_of(request: GenerationRequest, default_s: float | None) -> float | None:
    """The request's own client-side deadline, else the client's default."""
    return request.timeout_s if request.timeout_s is not None else default_s


class StreamState:
    """What every stream keeps, whatever its transport: its id and send time, the client-side
    deadline, the result being assembled and how the stream ended. Subclasses set ``_done``,
    ``_cancelled`` and ``_end_s`` and implement ``cancel``."""

    def __init__(self, request_id: str, sent_s: float, deadline_s: float | None) -> None:
        self.request_id = request_id
        self.sent_s = sent_s
        self._deadline_s = deadline_s
        self._builder = ResultBuilder(sent_s, request_id)
        self._done = False
        self._cancelled = False
        self._end_s: float | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        raise NotImplementedError

    def _time_left(self) -> float | None:
        """Seconds to the deadline (None: no deadline). Past it, the stream is cancelled and
        ``Timeout`` raised."""
        if self._deadline_s is None:
            return None
        remaining = self._deadline_s - time.perf_counter()
        if remaining <= 0:
            self.cancel()
            raise Timeout(f"request {self.request_id} timed out after {self._deadline_s - self.sent_s:.3g} s")
        return remaining

    def _build(self, end_s: float | None) -> GenerationResult:
        return self._builder.build(end_s=end_s, finish_reason="cancelled" if self._cancelled else None)


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def chunk_from_tensors(get: Callable[[str], np.ndarray | None], arrival_s: float) -> StreamChunk | None:
    """Build a chunk from output tensors (``get(name)`` returns a numpy array or None).

    Returns None for a response without outputs (an empty final response).
    """
    text = get("text_output")
    ids = get("output_ids")
    finish = get("finish_reason")
    n_in = get("num_input_tokens")
    n_out = get("num_output_tokens")
    if all(x is None for x in (text, ids, finish, n_in, n_out)):
        return None
    return StreamChunk(
        text="".join(_decode(v) for v in np.asarray(text).reshape(-1)) if text is not None else "",
        token_ids=tuple(int(t) for t in np.asarray(ids).reshape(-1)) if ids is not None else (),
        arrival_s=arrival_s,
        finish_reason=_decode(np.asarray(finish).reshape(-1)[0]) if finish is not None and finish.size else "",
        num_input_tokens=int(np.asarray(n_in).reshape(-1)[0]) if n_in is not None and n_in.size else None,
        num_output_tokens=int(np.asarray(n_out).reshape(-1)[0]) if n_out is not None and n_out.size else None,
    )


def _scalar(value: Any) -> Any:
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value


def _int_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        out: list[int] = []
        for v in value:
            out.extend(_int_list(v))
        return tuple(out)
    return (int(value),)


def chunk_from_json(obj: Mapping[str, Any], arrival_s: float) -> StreamChunk | None:
    """Build a chunk from one generate / generate_stream JSON response (outputs flattened by name).

    Scalars and one-element lists are both accepted for the [1]-shaped outputs.
    """
    if not any(k in obj for k in ("text_output", "output_ids", "finish_reason", "num_output_tokens")):
        return None
    text = obj.get("text_output")
    if isinstance(text, list):
        text = "".join(_decode(t) for t in text)
    n_in = _scalar(obj.get("num_input_tokens"))
    n_out = _scalar(obj.get("num_output_tokens"))
    return StreamChunk(
        text=_decode(text),
        token_ids=_int_list(obj.get("output_ids")),
        arrival_s=arrival_s,
        finish_reason=_decode(_scalar(obj.get("finish_reason"))),
        num_input_tokens=None if n_in is None else int(n_in),
        num_output_tokens=None if n_out is None else int(n_out),
    )
