"""The OpenAI streaming API as the load test speaks it: a scenario's request as a chat or text
completion body, and each server-sent event as a `StreamChunk`, so OpenAI-path samples are timed
and counted exactly like the gRPC and HTTP ones (tokens from the `token_ids` the server returns)."""

from __future__ import annotations

from typing import Any

from dsv4.client import GenerationRequest
from dsv4.client.http_client import SSEEvent, event_object
from dsv4.client.types import ServerError, StreamChunk

DONE = "[DONE]"


def request_body(request: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a streamed completion; usage and token ids asked for."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "return_token_ids": True}
    if request.messages is not None:
        path = "/v1/chat/completions"
        body["messages"] = [m.as_dict() for m in request.messages]
        body["max_completion_tokens"] = request.max_tokens
    else:
        path = "/v1/completions"
        body["prompt"] = request.prompt
        body["max_tokens"] = request.max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "min_tokens"):  # min_tokens: vLLM's extension
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    return path, {k: v for k, v in body.items() if v is not None}


def chunk_from_openai(event: SSEEvent, arrival_s: float) -> StreamChunk | None:
    """One event as a chunk: None for `[DONE]`; the usage event carries the token counts; an error
    event raises ServerError with the server's message."""
    if event.data.strip() == DONE:
        return None
    obj = event_object(event)
    if "error" in obj:
        error = obj["error"]
        raise ServerError(str(error.get("message", error) if isinstance(error, dict) else error))
    usage = obj.get("usage") or {}
    choices = obj.get("choices") or [{}]
    choice = choices[0]
    delta = choice.get("delta")
    text = (delta.get("content") if delta is not None else choice.get("text")) or ""  # chat / text completion
    return StreamChunk(text=text, token_ids=tuple(choice.get("token_ids") or ()), arrival_s=arrival_s,
                       finish_reason=choice.get("finish_reason") or "",
                       num_input_tokens=usage.get("prompt_tokens"), num_output_tokens=usage.get("completion_tokens"))
