"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with their HTTP status.

Triton's errors reach this server as `dsv4.client` errors; they are mapped so that an SDK's retry
logic does the right thing: bad input is a 400 naming the OpenAI field, a full decode queue a
429 (retry after a pause), a server that is stopping or unreachable a 503.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..types import Cancelled, ClientError, ConnectionFailed, InvalidArgument, ServerError, Timeout, Unavailable

# Triton input names as the OpenAI field a client set
TRITON_TO_OPENAI = {"text_input": "prompt", "max_tokens": "max_tokens", "min_tokens": "min_tokens",
                    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                    "stop_words": "stop"}
_FIELD_PREFIX = re.compile(r"\b(" + "|".join(TRITON_TO_OPENAI) + r"): ")
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
_FULL = re.compile(r"server is full|queue|too many", re.I)
_TOO_BIG = "needs more KV cache"
# status of a request whose client went away; nginx's, since HTTP has none
CLIENT_CLOSED = 499


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready; its Triton stream was cancelled."""


def bad_request(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def from_client_error(error: ClientError, renames: Mapping[str, str] | None = None) -> OpenAIError:
    """The OpenAI error for a failed Triton request; `renames` maps Triton field -> this request's field
    (`text_input` is `messages` for a chat request, `max_tokens` may be `max_completion_tokens`)."""
    message = _ENSEMBLE_PREFIX.sub("", error.message)
    match = _FIELD_PREFIX.match(message) or (_FIELD_PREFIX.search(message) if isinstance(error, InvalidArgument) else None)
    # Triton 2.51 sends a stream's error as text only; the tokenizer's "field: problem" says it is bad input
    bad_input = isinstance(error, InvalidArgument) or (type(error) is ServerError and match is not None)
    if bad_input or _TOO_BIG in message:
        field = match.group(1) if match else ("max_tokens" if _TOO_BIG in message else None)
        param = None if field is None else (renames or {}).get(field, TRITON_TO_OPENAI[field])
        return OpenAIError(400, message, param=param, code="invalid_value")
    if isinstance(error, ConnectionFailed):
        return OpenAIError(503, f"the Triton server cannot be reached: {message}", type="server_error",
                           code="service_unavailable", headers={"Retry-After": "5"})
    if isinstance(error, Unavailable):
        if _FULL.search(message):
            return OpenAIError(429, message, type="rate_limit_error", code="server_full", headers={"Retry-After": "1"})
        return OpenAIError(503, message, type="server_error", code="service_unavailable", headers={"Retry-After": "5"})
    if isinstance(error, Timeout):
        return OpenAIError(504, message, type="server_error", code="timeout")
    if isinstance(error, Cancelled):
        return OpenAIError(503, f"the request was cancelled by the server: {message}", type="server_error",
                           code="cancelled")
    return OpenAIError(500, message, type="server_error", code="internal_error")


def ended_early(finish_reason: str) -> OpenAIError:
    """A stream Triton ended without finishing the answer (server shutdown or cancellation)."""
    if finish_reason == "shutdown":
        return OpenAIError(503, "the server is shutting down; the answer was cut short", type="server_error",
                           code="service_unavailable", headers={"Retry-After": "5"})
    return OpenAIError(503, f"the server ended the request ({finish_reason})", type="server_error", code="cancelled")


def pydantic_param(location: tuple[Any, ...], fields: frozenset[str]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`; union-member tags are left out."""
    param = ""
    for part in location[1:] if location and location[0] == "body" else location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in fields:
            param += f".{part}" if param else part
    return param or None
