"""The HTTP application: `/v1/models`, `/v1/completions`, `/v1/chat/completions` and `/health`.

Every generation is one gRPC stream to the `dsv4` ensemble (`dsv4.client.aio`), so Triton stays
the one engine: its scheduling, limits, metrics and cancellation apply unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..aio import AsyncGrpcClient, AsyncGrpcStream
from ..types import GenerationRequest, StreamChunk
from .chat_output import ChatOutputParser
from .chat_template import TemplateError, render_prompt
from .config import OpenAIServerConfig
from .errors import (CLIENT_CLOSED, ClientDisconnected, OpenAIError, bad_request, ended_early, model_not_found,
                     pydantic_param, unauthorized)
from .generation import (FINISHED, Tally, drain, field_renames, finish_reason, next_chunk, token_ids_field,
                         triton_request, until_disconnected)
from .responses import SSE_DONE, Envelope, model_card, models_list, new_request_id, sse, usage
from .schemas import ChatCompletionRequest, CompletionRequest, Sampling, field_names

log = logging.getLogger("dsv4.openai")
Body = TypeVar("Body", bound=BaseModel)
_FIELDS = field_names()
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# the legacy completions endpoint's documented default
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class _Triton:
    """The one asyncio gRPC client, made inside the running event loop on first use."""

    def __init__(self, config: OpenAIServerConfig) -> None:
        self.config = config
        self._client: AsyncGrpcClient | None = None

    @property
    def client(self) -> AsyncGrpcClient:
        if self._client is None:
            self._client = AsyncGrpcClient(self.config.triton_url, model=self.config.triton_model,
                                           timeout_s=self.config.request_timeout_s)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def create_app(config: OpenAIServerConfig) -> FastAPI:
    triton = _Triton(config)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.close()

    # no interactive docs: nothing beyond the API itself is served
    app = FastAPI(title="dsv4-openai", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("You didn't provide an API key: send it as the header 'Authorization: Bearer KEY'.")
        # compare against every key, each in constant time
        if not sum(secrets.compare_digest(token.encode(), key.encode()) for key in config.api_keys):
            raise unauthorized("Incorrect API key provided.")

    def served_model(name: str | None) -> str:
        if name is None:
            return config.default_model
        if name not in config.model_names:
            raise model_not_found(name)
        return name

    @app.get("/health")
    async def health() -> JSONResponse:
        if await triton.client.is_ready():
            return JSONResponse({"status": "ok"})
        raise OpenAIError(503, f"Triton at {config.triton_url} is not ready", type="server_error",
                          code="service_unavailable")

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(models_list(config.model_names, started))

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(model_card(served_model(model), started))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, CompletionRequest)
        rid = _request_id(request)
        envelope = Envelope(f"cmpl-{rid}", "text_completion", served_model(body.model))
        gen = triton_request(body, body.prompt_text, rid, COMPLETIONS_DEFAULT_MAX_TOKENS, config.request_timeout_s)
        echo = body.prompt_text if body.echo else ""

        def whole(text: str, tally: Tally) -> dict[str, Any]:
            choice = {"text": echo + text, "finish_reason": finish_reason(tally), "logprobs": None,
                      **token_ids_field(body.return_token_ids, tally.token_ids)}
            return envelope.body(choice, usage(tally.prompt_tokens, tally.completion_tokens))

        def events(stream: AsyncGrpcStream, first: StreamChunk | None) -> AsyncIterator[bytes]:
            return _completion_events(stream, first, envelope, body, echo)

        return await _answer(request, triton, body, gen, envelope, whole, events)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        rid = _request_id(request)
        envelope = Envelope(f"chatcmpl-{rid}", "chat.completion", served_model(body.model))
        thinking = body.wants_thinking(config.thinking)
        try:
            prompt = render_prompt([m.model_dump(exclude_none=True) for m in body.messages],
                                   tools=body.active_tools(), thinking=thinking)
        except TemplateError as error:
            raise bad_request(error.param, str(error)) from None
        gen = triton_request(body, prompt, rid, config.default_max_tokens, config.request_timeout_s)

        def whole(text: str, tally: Tally) -> dict[str, Any]:
            parser = ChatOutputParser(thinking)
            parser.feed(text)
            parser.finish()
            choice = {"message": parser.message(), "logprobs": None,
                      "finish_reason": finish_reason(tally, tool_calls=parser.has_tool_calls),
                      **token_ids_field(body.return_token_ids, tally.token_ids)}
            return envelope.body(choice, usage(tally.prompt_tokens, tally.completion_tokens))

        def events(stream: AsyncGrpcStream, first: StreamChunk | None) -> AsyncIterator[bytes]:
            return _chat_events(stream, first, envelope, body, ChatOutputParser(thinking))

        return await _answer(request, triton, body, gen, envelope, whole, events)

    return app


async def _answer(request: Request, triton: _Triton, body: Sampling, gen: GenerationRequest, envelope: Envelope,
                  whole: Callable[[str, Tally], dict[str, Any]],
                  events: Callable[[AsyncGrpcStream, StreamChunk | None], AsyncIterator[bytes]]) -> Response:
    """Start the Triton stream and answer: one JSON body, or server-sent events."""
    headers = {"X-Request-Id": gen.request_id}
    renames = field_renames(body)
    stream = triton.client.stream(gen)
    started = time.perf_counter()
    try:
        if not body.stream:
            async def whole_answer() -> tuple[str, Tally]:
                return await drain(stream, await next_chunk(stream, renames), renames)

            text, tally = await until_disconnected(request, whole_answer())
            if tally.finish_reason not in FINISHED:
                raise ended_early(tally.finish_reason or "no final response")
            _log_done(envelope, body, tally, started)
            return JSONResponse(whole(text, tally), headers=headers)
        first = await until_disconnected(request, next_chunk(stream, renames))
    except BaseException:
        stream.cancel()
        raise
    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(events(stream, first), media_type="text/event-stream", headers=headers)


async def _chat_events(stream: AsyncGrpcStream, first: StreamChunk | None, envelope: Envelope,
                       body: ChatCompletionRequest, parser: ChatOutputParser) -> AsyncIterator[bytes]:
    tally, renames, started = Tally(), field_renames(body), time.perf_counter()
    with_usage = body.include_usage
    try:
        yield sse(envelope.chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}, with_usage=with_usage))
        chunk = first
        while chunk is not None:
            tally.add(chunk)
            deltas = [parser.feed(chunk.text)] + ([parser.finish()] if chunk.finish_reason else [])
            ids = token_ids_field(body.return_token_ids, chunk.token_ids) if chunk.token_ids else {}
            for delta in deltas:
                if delta or ids:
                    yield sse(envelope.chunk({"delta": delta.as_openai(), "logprobs": None, "finish_reason": None,
                                              **ids}, with_usage=with_usage))
                    ids = {}
            if chunk.finish_reason:
                break
            chunk = await next_chunk(stream, renames)
        if tally.finish_reason not in FINISHED:
            raise ended_early(tally.finish_reason or "no final response")
        reason = finish_reason(tally, tool_calls=parser.has_tool_calls)
        yield sse(envelope.chunk({"delta": {}, "logprobs": None, "finish_reason": reason}, with_usage=with_usage))
        async for tail in _stream_end(envelope, body, tally, started):
            yield tail
    except OpenAIError as error:
        yield sse(error.body())
    except asyncio.CancelledError:
        log.info("%s: client disconnected after %d tokens; Triton stream cancelled", envelope.id, tally.completion_tokens)
        raise
    finally:
        stream.cancel()


async def _completion_events(stream: AsyncGrpcStream, first: StreamChunk | None, envelope: Envelope,
                             body: CompletionRequest, echo: str) -> AsyncIterator[bytes]:
    tally, renames, started = Tally(), field_renames(body), time.perf_counter()
    with_usage = body.include_usage
    try:
        chunk, prefix = first, echo
        while chunk is not None:
            tally.add(chunk)
            reason = chunk.finish_reason if chunk.finish_reason in FINISHED else None
            if chunk.finish_reason and reason is None:
                raise ended_early(chunk.finish_reason)
            yield sse(envelope.chunk({"text": prefix + chunk.text, "logprobs": None, "finish_reason": reason,
                                      **token_ids_field(body.return_token_ids, chunk.token_ids)},
                                     with_usage=with_usage))
            prefix = ""
            if chunk.finish_reason:
                break
            chunk = await next_chunk(stream, renames)
        if tally.finish_reason not in FINISHED:
            raise ended_early(tally.finish_reason or "no final response")
        async for tail in _stream_end(envelope, body, tally, started):
            yield tail
    except OpenAIError as error:
        yield sse(error.body())
    except asyncio.CancelledError:
        log.info("%s: client disconnected after %d tokens; Triton stream cancelled", envelope.id, tally.completion_tokens)
        raise
    finally:
        stream.cancel()


async def _stream_end(envelope: Envelope, body: Sampling, tally: Tally, started: float) -> AsyncIterator[bytes]:
    if body.include_usage:
        yield sse(envelope.usage_chunk(usage(tally.prompt_tokens, tally.completion_tokens)))
    yield SSE_DONE
    _log_done(envelope, body, tally, started)


def _log_done(envelope: Envelope, body: Sampling, tally: Tally, started: float) -> None:
    log.info("%s: %s, %d prompt + %d completion tokens in %.3f s%s", envelope.id, tally.finish_reason,
             tally.prompt_tokens, tally.completion_tokens, time.perf_counter() - started,
             f" (user {body.user})" if body.user else "")


async def _parse(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise bad_request(None, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise bad_request(None, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        param = pydantic_param(tuple(first["loc"]), _FIELDS)
        message = first["msg"].removeprefix("Value error, ")
        raise bad_request(param, f"{param}: {message}" if param else message) from None


def _request_id(request: Request) -> str:
    """The caller's X-Request-Id when it is a sane token (it labels the Triton request), else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else new_request_id()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, _error: ClientDisconnected) -> Response:
        log.info("%s %s: client disconnected before the answer; Triton stream cancelled", request.method,
                 request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        body = OpenAIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)
        return JSONResponse(body.body(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = OpenAIError(500, f"internal error: {type(error).__name__}", type="server_error", code="internal_error")
        return JSONResponse(body.body(), status_code=500)
