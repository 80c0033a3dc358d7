"""Client library for the dsv4 Triton server: gRPC streaming, HTTP generate, asyncio, retries.

    from dsv4.client import GrpcClient, GenerationRequest

    with GrpcClient("127.0.0.1:8001") as client:
        for chunk in client.stream(GenerationRequest(prompt="Hello", max_tokens=32)):
            print(chunk.text, end="", flush=True)

The asyncio clients live in ``dsv4.client.aio`` (imported on first use, it pulls in aiohttp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .grpc_client import GrpcClient, GrpcStream
from .http_client import HttpClient, HttpStream, SSEEvent, SSEParser
from .retry import RetryingTransport, RetryPolicy, retry_call, retry_call_async
from .transport import Endpoint, ResponseStream, ResultBuilder, Transport, collect, parse_url
from .types import (
    Cancelled,
    ChatMessage,
    ClientError,
    ConnectionFailed,
    GenerationRequest,
    GenerationResult,
    InvalidArgument,
    ServerError,
    StreamChunk,
    Timeout,
    Unavailable,
)

if TYPE_CHECKING:
    from .aio import AsyncGrpcClient, AsyncHttpClient

__all__ = [
    "AsyncGrpcClient",
    "AsyncHttpClient",
    "Cancelled",
    "ChatMessage",
    "ClientError",
    "ConnectionFailed",
    "Endpoint",
    "GenerationRequest",
    "GenerationResult",
    "GrpcClient",
    "GrpcStream",
    "HttpClient",
    "HttpStream",
    "InvalidArgument",
    "ResponseStream",
    "ResultBuilder",
    "RetryPolicy",
    "RetryingTransport",
    "SSEEvent",
    "SSEParser",
    "ServerError",
    "StreamChunk",
    "Timeout",
    "Transport",
    "Unavailable",
    "collect",
    "connect",
    "parse_url",
    "retry_call",
    "retry_call_async",
]


def connect(url: str | None = None, *, protocol: str | None = None, model: str = "dsv4",
            timeout_s: float | None = None) -> GrpcClient | HttpClient:
    """A sync client for ``url`` (``grpc://``, ``http://`` or bare ``host:port`` = gRPC)."""
    endpoint = parse_url(url, protocol)
    if endpoint.protocol == "http":
        return HttpClient(endpoint.address, model=model, timeout_s=timeout_s)
    return GrpcClient(endpoint.address, model=model, timeout_s=timeout_s)


def __getattr__(name: str) -> Any:
    if name in ("AsyncGrpcClient", "AsyncHttpClient"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
