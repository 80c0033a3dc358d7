"""Synchronous HTTP client over Triton's generate extension (``/generate``, ``/generate_stream``).

Uses urllib3 (a dependency of tritonclient) with one connection pool per client; the pool is
thread-safe, so one :class:`HttpClient` may serve several threads. ``cancel()`` drops the
connection. Triton's documentation says HTTP clients cannot cancel; with 2.51's
``generate_stream`` the model did see ``is_cancelled()`` once the server next tried to write to
the closed connection, but a non-streaming ``/generate`` runs to completion.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import quote

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)

from .transport import (
    DEFAULT_HTTP_URL,
    StreamState,
    chunk_from_json,
    parse_url,
    request_id_of,
    single_result,
    timeout_of,
)
from .types import (
    ClientError,
    ConnectionFailed,
    GenerationRequest,
    GenerationResult,
    ServerError,
    StreamChunk,
    Timeout,
    error_from_http_status,
    error_from_message,
)

__all__ = [
    "HttpClient",
    "HttpStream",
    "SSEEvent",
    "SSEParser",
    "chunk_from_event",
    "event_object",
    "error_from_body",
    "iter_body",
    "result_from_body",
]


class SSEEvent(NamedTuple):
    data: str
    event: str = "message"
    id: str = ""


class SSEParser:
    """Incremental ``text/event-stream`` parser: ``feed`` bytes as they arrive, get whole events.

    Handles CRLF / LF / CR line ends, events and multi-byte characters split across reads,
    multi-line ``data``, comments and ``event``/``id`` fields. ``close`` also returns an event
    whose terminating blank line never came.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._id = ""
        self._first_line = True

    def feed(self, data: bytes) -> list[SSEEvent]:
        self._buf += data
        events: list[SSEEvent] = []
        while True:
            line = self._next_line(final=False)
            if line is None:
                return events
            self._line(line, events)

    def close(self) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        while (line := self._next_line(final=True)) is not None:
            self._line(line, events)
        if self._data:
            events.append(self._dispatch())
        return events

    def _next_line(self, *, final: bool) -> str | None:
        buf = self._buf
        cr, lf = buf.find(b"\r"), buf.find(b"\n")
        if cr < 0 and lf < 0:
            if final and buf:
                self._buf = b""
                return self._decode(buf)
            return None
        if cr >= 0 and (lf < 0 or cr < lf):
            if cr + 1 == len(buf) and not final:
                return None  # maybe the first half of CRLF
            end, skip = cr, 2 if buf[cr + 1 : cr + 2] == b"\n" else 1
        else:
            end, skip = lf, 1
        self._buf = buf[end + skip :]
        return self._decode(buf[:end])

    def _decode(self, raw: bytes) -> str:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        return line

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(self._dispatch())
            else:
                self._event = ""
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
        self._data = []
        self._event = ""
        return event


def error_from_body(status: int, body: bytes) -> ClientError:
    """The error for a non-200 response; Triton's body is ``{"error": "<message>"}``."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("data:"):
        # generate_stream sends an error in the first response as an SSE event
        parser = SSEParser()
        events = parser.feed(body) + parser.close()
        text = events[0].data if events else text
    try:
        obj = json.loads(text)
        message = str(obj.get("error", text)) if isinstance(obj, dict) else text
    except ValueError:
        message = text
    return error_from_http_status(status, message or f"HTTP {status}")


def event_object(event: SSEEvent) -> dict[str, Any]:
    """An SSE event's JSON object; ServerError when the data is not one."""
    try:
        obj = json.loads(event.data)
    except ValueError as e:
        raise ServerError(f"malformed event from server: {event.data[:200]!r}") from e
    if not isinstance(obj, dict):
        raise ServerError(f"unexpected event from server: {event.data[:200]!r}")
    return obj


def chunk_from_event(event: SSEEvent, arrival_s: float) -> StreamChunk | None:
    """Turn one SSE event into a chunk; raises the mapped error for an ``{"error": ...}`` event."""
    obj = event_object(event)
    if "error" in obj:
        raise error_from_message(str(obj["error"]))
    return chunk_from_json(obj, arrival_s)


def iter_body(response: Any) -> Iterator[bytes]:
    """Yield body bytes as soon as they arrive (one HTTP chunk at a time when chunked)."""
    if getattr(response, "chunked", False) and response.supports_chunked_reads():
        yield from response.read_chunked(decode_content=True)
        return
    while data := response.read1(65536):
        yield data


def result_from_body(status: int, data: bytes, sent_s: float, request_id: str, now: float) -> GenerationResult:
    """The result of one ``/generate`` call from its status and body."""
    if status != 200:
        raise error_from_body(status, data)
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ServerError(f"malformed response from server: {data[:200]!r}") from e
    if isinstance(obj, dict) and "error" in obj:
        raise error_from_message(str(obj["error"]))
    return single_result(chunk_from_json(obj, now) if isinstance(obj, dict) else None, sent_s, request_id, end_s=now)


def _map_transport_error(e: BaseException) -> ClientError:
    if isinstance(e, MaxRetryError) and e.reason is not None:
        return _map_transport_error(e.reason)
    if isinstance(e, ReadTimeoutError | socket.timeout | TimeoutError):
        return Timeout(f"no response from server in time: {e}")
    if isinstance(e, NewConnectionError):
        return ConnectionFailed(f"cannot connect: {e}")
    if isinstance(e, ConnectTimeoutError):
        return ConnectionFailed(f"connection timed out: {e}")
    return ConnectionFailed(f"connection failed: {e}")


class HttpStream(StreamState):
    """Chunks of one ``generate_stream`` request; iteration ends when the server ends the stream."""

    def __init__(self, response: Any, request_id: str, sent_s: float, deadline_s: float | None) -> None:
        super().__init__(request_id, sent_s, deadline_s)
        self._response = response
        self._gen = self._chunks()

    def __iter__(self) -> HttpStream:
        return self

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        try:
            chunk = next(self._gen)
        except StopIteration:
            self._finish(clean=True)
            raise
        except ClientError:
            self._finish(clean=False)
            raise
        except (HTTPError, OSError) as e:
            self._finish(clean=False)
            if self._cancelled:
                raise StopIteration from None
            raise _map_transport_error(e) from e
        self._builder.add(chunk)
        return chunk

    def _chunks(self) -> Iterator[StreamChunk]:
        parser = SSEParser()
        for data in iter_body(self._response):
            now = time.perf_counter()
            for event in parser.feed(data):
                chunk = chunk_from_event(event, now)
                if chunk is not None:
                    yield chunk
            self._arm_read_timeout()
        for event in parser.close():
            chunk = chunk_from_event(event, time.perf_counter())
            if chunk is not None:
                yield chunk

    def _arm_read_timeout(self) -> None:
        remaining = self._time_left()
        if remaining is None:
            return
        sock = getattr(getattr(self._response, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(remaining)

    def _finish(self, *, clean: bool) -> None:
        if not self._done:
            self._done = True
            self._end_s = time.perf_counter() if self._builder.last_s is None else self._builder.last_s
            if not clean:
                # a half-read connection must not go back to the pool
                self._response.close()
            self._response.release_conn()

    def cancel(self) -> None:
        """Stop reading and drop the connection (the server notices only when it next writes)."""
        if self._done:
            return
        self._cancelled = True
        self._end_s = time.perf_counter()
        self._done = True
        sock = getattr(getattr(self._response, "connection", None), "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._response.close()
        self._response.release_conn()

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> HttpStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self._build(self._end_s if self._cancelled else None)


class HttpClient:
    """Blocking client for the ``dsv4`` ensemble over Triton's HTTP generate extension."""

    def __init__(
        self,
        url: str = DEFAULT_HTTP_URL,
        *,
        model: str = "dsv4",
        timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        max_connections: int = 8,
        headers: dict[str, str] | None = None,
    ) -> None:
        endpoint = parse_url(url, "http")
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._pool = urllib3.connection_from_url(endpoint.address, maxsize=max_connections, block=False)

    def _path(self, endpoint: str) -> str:
        return f"/v2/models/{quote(self.model, safe='')}/{endpoint}"

    def _post(self, path: str, body: dict[str, Any], *, stream: bool, timeout: float | None) -> Any:
        headers = dict(self._headers)
        if stream:
            headers["Accept"] = "text/event-stream"
        connect = self.connect_timeout_s if timeout is None else min(self.connect_timeout_s, timeout)
        try:
            return self._pool.urlopen(
                "POST",
                path,
                body=json.dumps(body).encode("utf-8"),
                headers=headers,
                retries=False,
                redirect=False,
                preload_content=not stream,
                timeout=urllib3.Timeout(connect=connect, read=timeout),
            )
        except (HTTPError, OSError) as e:
            raise _map_transport_error(e) from e

    @staticmethod
    def _body(request: GenerationRequest, request_id: str, *, stream: bool) -> dict[str, Any]:
        return {"id": request_id, **request.input_values(stream=stream)}

    def stream(self, request: GenerationRequest) -> HttpStream:
        """POST to ``generate_stream`` and return the chunk iterator (SSE, one event per response)."""
        request_id = request_id_of(request)
        timeout = timeout_of(request, self.timeout_s)
        sent_s = time.perf_counter()
        response = self._post(self._path("generate_stream"), self._body(request, request_id, stream=True),
                              stream=True, timeout=timeout)
        if response.status != 200:
            try:
                body = response.read()
            except (HTTPError, OSError):
                body = b""
            response.release_conn()
            raise error_from_body(response.status, body)
        return HttpStream(response, request_id, sent_s, None if timeout is None else sent_s + timeout)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.stream(request).result()

    def infer(self, request: GenerationRequest) -> GenerationResult:
        """One ``/generate`` call with ``stream=false`` (the server sends exactly one response)."""
        request_id = request_id_of(request)
        timeout = timeout_of(request, self.timeout_s)
        sent_s = time.perf_counter()
        response = self._post(self._path("generate"), self._body(request, request_id, stream=False),
                              stream=False, timeout=timeout)
        return result_from_body(response.status, response.data, sent_s, request_id, time.perf_counter())

    def is_ready(self) -> bool:
        try:
            r = self._pool.urlopen("GET", self._path("ready"), retries=False, timeout=self.connect_timeout_s)
            return r.status == 200
        except (HTTPError, OSError):
            return False

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
