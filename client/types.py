"""Value types shared by every transport: requests, streamed chunks, results and errors.

All times are seconds. Absolute instants come from ``time.perf_counter()`` (monotonic, same
clock for every transport in a process); durations in results are relative to the instant the
request was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "ChatMessage",
    "GenerationRequest",
    "StreamChunk",
    "GenerationResult",
    "ClientError",
    "InvalidArgument",
    "Unavailable",
    "ConnectionFailed",
    "Cancelled",
    "Timeout",
    "ServerError",
    "error_from_code",
    "error_from_grpc_status",
    "error_from_http_status",
    "error_from_message",
]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _as_message(m: ChatMessage | Mapping[str, Any]) -> ChatMessage:
    if isinstance(m, ChatMessage):
        return m
    if isinstance(m, Mapping) and "role" in m and "content" in m:
        return ChatMessage(str(m["role"]), str(m["content"]))
    raise TypeError(f"a chat message needs 'role' and 'content', got {m!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request for the ``dsv4`` ensemble.

    Exactly one of ``prompt`` (plain text) or ``messages`` (chat turns; the server applies the
    chat template) must be given. ``None`` sampling fields are not sent, so the server's
    defaults apply. Ranges are checked by the server, whose message is passed through.
    ``timeout_s`` bounds the whole request on the client side (``None``: the transport default).
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    exclude_input_in_output: bool = True
    request_id: str = ""
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt= or messages=")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError("prompt must be a str")
        if self.messages is not None:
            # frozen: normalise list/dict input once, here
            object.__setattr__(self, "messages", tuple(_as_message(m) for m in self.messages))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    @property
    def apply_chat_template(self) -> bool:
        return self.messages is not None

    @property
    def text_input(self) -> str:
        """What goes into the ``text_input`` tensor: the prompt, or the messages as a JSON list."""
        if self.messages is not None:
            return json.dumps([m.as_dict() for m in self.messages], ensure_ascii=False)
        assert self.prompt is not None
        return self.prompt

    def input_values(self, *, stream: bool) -> dict[str, Any]:
        """Model input name -> Python value (list for ``stop_words``), only the fields that are set."""
        values: dict[str, Any] = {"text_input": self.text_input, "stream": stream}
        optional = {
            "max_tokens": self.max_tokens,
            "min_tokens": self.min_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }
        values.update({k: v for k, v in optional.items() if v is not None})
        if self.stop:
            values["stop_words"] = list(self.stop)
        values["exclude_input_in_output"] = self.exclude_input_in_output
        if self.apply_chat_template:
            values["apply_chat_template"] = True
        return values

    def with_messages(self, messages: Iterable[ChatMessage | Mapping[str, Any]]) -> GenerationRequest:
        return replace(self, prompt=None, messages=tuple(_as_message(m) for m in messages))


@dataclass(frozen=True)
class StreamChunk:
    """One response of a stream: a text delta and the token ids it decodes.

    ``arrival_s`` is ``time.perf_counter()`` when the response reached the client.
    ``num_output_tokens`` is the server's cumulative count, ``finish_reason`` is "" until the
    last response ("stop", "length" or "cancelled").
    """

    text: str
    token_ids: tuple[int, ...]
    arrival_s: float
    finish_reason: str = ""
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None

    @property
    def has_tokens(self) -> bool:
        return bool(self.token_ids) or bool(self.text)


@dataclass(frozen=True)
class GenerationResult:
    """A finished (or cancelled) generation, assembled from its chunks.

    ``ttft_s`` is the time from send to the first chunk carrying tokens (None if none came),
    ``total_s`` the time from send to the last response. ``token_times_s`` has one entry per
    token id (the arrival of the chunk that carried it), ``chunk_times_s`` one per chunk; both
    are relative to send.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_input_tokens: int | None
    num_output_tokens: int
    ttft_s: float | None
    total_s: float
    token_times_s: tuple[float, ...] = ()
    chunk_times_s: tuple[float, ...] = ()
    request_id: str = ""

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency, genai-perf's definition: (latency - TTFT) / (tokens - 1)."""
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.total_s - self.ttft_s) / (self.num_output_tokens - 1)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "num_input_tokens": self.num_input_tokens,
            "num_output_tokens": self.num_output_tokens,
        }


class ClientError(Exception):
    """Base of every error this package raises for a failed request.

    ``code`` is the Triton error code name (INVALID_ARG, UNAVAILABLE, CANCELLED, ...),
    ``http_status`` the HTTP status when one was received.
    """

    code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.http_status = http_status

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ClientError):
    """The server rejected the request's contents (INVALID_ARG, HTTP 400). Never retried."""

    code = "INVALID_ARG"


class Unavailable(ClientError):
    """The server cannot take the request now (UNAVAILABLE, HTTP 503). Safe to retry."""

    code = "UNAVAILABLE"


class ConnectionFailed(Unavailable):
    """The server could not be reached, or the connection broke."""


class Cancelled(ClientError):
    code = "CANCELLED"


class Timeout(ClientError):
    """The client-side deadline of the request expired."""

    code = "DEADLINE_EXCEEDED"


class ServerError(ClientError):
    """Any other error reported by the server (INTERNAL, NOT_FOUND, UNIMPLEMENTED, UNKNOWN ...)."""


_CODE_CLASSES: dict[str, type[ClientError]] = {
    "INVALID_ARG": InvalidArgument,
    "INVALID_ARGUMENT": InvalidArgument,
    "UNAVAILABLE": Unavailable,
    "CANCELLED": Cancelled,
    "DEADLINE_EXCEEDED": Timeout,
}

_HTTP_CODES = {400: "INVALID_ARG", 404: "NOT_FOUND", 500: "INTERNAL", 501: "UNSUPPORTED", 503: "UNAVAILABLE"}

# gRPC messages that mean "no connection" rather than "the server said no"
_CONNECTION_MARKERS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
    "name resolution",
    "socket closed",
    "connection reset",
    "broken pipe",
    "unreachable",
    "connections to all backends failing",
    "endpoint closing",
)

# stream errors (gRPC stream error_message, SSE error events) arrive without a code
_MESSAGE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "UNAVAILABLE",
        re.compile(
            r"exceeds maximum queue size|server is stopping|not at ready state|request timeout expired"
            r"|\bunavailable\b|server is (full|busy|overloaded)|too many (requests|concurrent)|try again later",
            re.I,
        ),
    ),
    ("CANCELLED", re.compile(r"\bcancell?ed\b", re.I)),
    (
        "INVALID_ARG",
        re.compile(
            r"\binvalid\b|\bmust be\b|\bexpected\b|\bunexpected\b|\brequired\b|\bmissing\b|out of range"
            r"|too long|\bexceeds\b|not supported for|\bunknown (input|parameter|field)",
            re.I,
        ),
    ),
)


def error_from_code(code: str, message: str, *, http_status: int | None = None) -> ClientError:
    code = code.upper()
    if code == "UNAVAILABLE" and any(m in message.lower() for m in _CONNECTION_MARKERS):
        return ConnectionFailed(message, http_status=http_status)
    cls = _CODE_CLASSES.get(code, ServerError)
    return cls(message, code=code if cls is ServerError else None, http_status=http_status)


def error_from_grpc_status(status: str | None, message: str) -> ClientError:
    """Map a tritonclient status string ("StatusCode.INVALID_ARGUMENT") or None to an error."""
    if not status:
        return error_from_message(message)
    return error_from_code(status.rsplit(".", 1)[-1], message)


def error_from_http_status(status: int, message: str) -> ClientError:
    """Map an HTTP error status and message to an error.

    Triton 2.51 answers 400 for *every* error a model sends in a response on ``/generate`` and
    ``/generate_stream`` (an UNAVAILABLE from the model included), so a 400 is classified by its
    message first and is INVALID_ARG only when the message says nothing else.
    """
    if status == 400:
        by_message = error_from_message(message)
        if not isinstance(by_message, ServerError):
            by_message.http_status = status
            return by_message
        return InvalidArgument(message, http_status=status)
    return error_from_code(_HTTP_CODES.get(status, "INTERNAL" if status >= 500 else "UNKNOWN"), message,
                           http_status=status)


def error_from_message(message: str) -> ClientError:
    """Classify an error that arrived inside a stream, where Triton 2.51 sends only the text."""
    for code, pattern in _MESSAGE_RULES:
        if pattern.search(message):
            return error_from_code(code, message)
    return ServerError(message)
