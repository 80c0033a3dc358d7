"""From a validated OpenAI request to a Triton stream and back.

A request's first chunk is awaited before any HTTP status is sent, so everything Triton refuses
up front (bad fields, a full queue, a stopping server) becomes a proper 4xx/5xx. While no byte
of the answer has been sent, a client that disconnects cancels its Triton stream here; once a
streamed answer is under way, Starlette cancels the response task and the stream with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from ..aio import AsyncGrpcStream
from ..types import ClientError, GenerationRequest, StreamChunk
from .errors import ClientDisconnected, from_client_error
from .schemas import ChatCompletionRequest, Sampling

T = TypeVar("T")
FINISHED = ("stop", "length")


def triton_request(body: Sampling, prompt: str, request_id: str, default_max_tokens: int,
                   timeout_s: float | None) -> GenerationRequest:
    """The Triton request for `body`; ranges the server knows (max_tokens limit, context) it checks itself."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max_tokens
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        min_tokens=max_tokens if body.ignore_eos else body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        # vLLM spells "no top-k" -1; Triton 0
        top_k=None if body.top_k is None else max(body.top_k, 0),
        seed=body.seed,
        stop=body.stop_strings(),
        request_id=request_id,
        timeout_s=timeout_s,
    )


def field_renames(body: Sampling) -> dict[str, str]:
    """Triton field -> the field this request set, for error messages' `param`."""
    if isinstance(body, ChatCompletionRequest):
        return {"text_input": "messages",
                "max_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens"}
    return {"text_input": "prompt"}


@dataclass
class Tally:
    """Counts and ids of one answer, as its chunks arrive."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)

    def add(self, chunk: StreamChunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        if chunk.num_input_tokens is not None:
            self.prompt_tokens = chunk.num_input_tokens
        self.completion_tokens = chunk.num_output_tokens if chunk.num_output_tokens is not None else len(self.token_ids)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason


async def next_chunk(stream: AsyncGrpcStream, renames: Mapping[str, str]) -> StreamChunk | None:
    """The stream's next chunk (None after the last); Triton's errors as OpenAI errors."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except ClientError as error:
        raise from_client_error(error, renames) from error


async def drain(stream: AsyncGrpcStream, first: StreamChunk | None, renames: Mapping[str, str]) -> tuple[str, Tally]:
    """The whole answer of a stream whose first chunk was read."""
    tally, parts = Tally(), []
    chunk = first
    while chunk is not None:
        tally.add(chunk)
        parts.append(chunk.text)
        if chunk.finish_reason:
            break
        chunk = await next_chunk(stream, renames)
    return "".join(parts), tally


async def _disconnected(request: Request) -> None:
    # the body is already read, so the next ASGI message is the client going away
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it (cancelling its Triton stream) and
    raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        task.cancel()


def finish_reason(tally: Tally, *, tool_calls: bool = False) -> str:
    return "tool_calls" if tool_calls and tally.finish_reason == "stop" else tally.finish_reason


def token_ids_field(enabled: bool, ids: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """vLLM's `return_token_ids` extension: the generated ids beside the text."""
    return {"token_ids": list(ids)} if enabled else {}
