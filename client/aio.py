"""asyncio clients: gRPC streaming (``tritonclient.grpc.aio``) and HTTP streaming (aiohttp).

Each ``stream()`` returns an async iterator of :class:`StreamChunk` with ``cancel()`` and
``result()``. Cancelling the task that iterates it cancels the request (gRPC: Triton cancels it
server-side; HTTP: the connection is dropped). One client may run many requests concurrently:
every gRPC request gets its own bidirectional stream on the shared channel.

    async with AsyncGrpcClient("127.0.0.1:8001") as client:
        async for chunk in client.stream(GenerationRequest(prompt="Hi", max_tokens=16)):
            print(chunk.text, end="")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import tritonclient.grpc.aio as grpcaio

from .grpc_client import build_inputs, to_client_error
from .http_client import SSEParser, chunk_from_event, error_from_body, result_from_body
from .transport import (
    DEFAULT_GRPC_URL,
    DEFAULT_HTTP_URL,
    StreamState,
    chunk_from_tensors,
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
    StreamChunk,
    Timeout,
)

if TYPE_CHECKING:  # typing.Self is new in 3.11; NVIDIA's Triton 24.10 image runs Python 3.10
    from typing_extensions import Self

__all__ = ["AsyncGrpcClient", "AsyncHttpClient", "AsyncGrpcStream", "AsyncHttpStream"]


class _AsyncStreamBase(StreamState):
    def __init__(self, request_id: str, timeout_s: float | None) -> None:
        sent_s = time.perf_counter()
        super().__init__(request_id, sent_s, None if timeout_s is None else sent_s + timeout_s)

    def __aiter__(self) -> _AsyncStreamBase:
        return self

    async def __anext__(self) -> StreamChunk:
        raise NotImplementedError

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        return self._build(self._end_s if self._cancelled else None)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> _AsyncStreamBase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncGrpcStream(_AsyncStreamBase):
    """One request on its own gRPC bidirectional stream."""

    def __init__(self, client: Any, model: str, inputs: list[Any], request_id: str, timeout_s: float | None) -> None:
        super().__init__(request_id, timeout_s)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            # the request side closes after one request; Triton ends the stream after the last response
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}

        self._responses = client.stream_infer(one_request())

    async def __anext__(self) -> StreamChunk:
        while not self._done:
            try:
                remaining = self._time_left()
                item = await asyncio.wait_for(self._responses.__anext__(), remaining)
            except StopAsyncIteration:
                self._finish()
                raise
            except asyncio.TimeoutError:
                self.cancel()
                raise Timeout(f"request {self.request_id} timed out") from None
            except asyncio.CancelledError:
                self.cancel()
                raise
            except ClientError:
                raise
            except Exception as e:
                if self._cancelled:
                    break
                self._finish(cancel_call=True)
                raise to_client_error(e) from e
            result, error = item
            if error is not None:
                self._finish(cancel_call=True)
                raise to_client_error(error)
            chunk = _chunk_from_result(result)
            if chunk is not None:
                self._builder.add(chunk)
                return chunk
        raise StopAsyncIteration

    def _finish(self, *, cancel_call: bool = False) -> None:
        if not self._done:
            self._done = True
            self._end_s = time.perf_counter()
            if cancel_call:
                self._responses.cancel()

    def cancel(self) -> None:
        if self._done:
            return
        self._cancelled = True
        self._finish(cancel_call=True)


def _chunk_from_result(result: Any) -> StreamChunk | None:
    return chunk_from_tensors(result.as_numpy, time.perf_counter())


class _AsyncClient:
    """What both asyncio clients share: ``generate`` drains ``stream``, and the async context."""

    def stream(self, request: GenerationRequest) -> _AsyncStreamBase:
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        stream = self.stream(request)
        try:
            return await stream.result()
        finally:
            stream.cancel()

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncGrpcClient(_AsyncClient):
    """asyncio client for the ``dsv4`` ensemble over Triton gRPC (one channel, many streams)."""

    def __init__(
        self,
        url: str = DEFAULT_GRPC_URL,
        *,
        model: str = "dsv4",
        unary_model: str = "dsv4_unary",
        timeout_s: float | None = None,
        verbose: bool = False,
    ) -> None:
        endpoint = parse_url(url, "grpc")
        self.model = model
        self.unary_model = unary_model
        self.timeout_s = timeout_s
        self._client = grpcaio.InferenceServerClient(endpoint.address, verbose=verbose, ssl=endpoint.ssl)

    def stream(self, request: GenerationRequest) -> AsyncGrpcStream:
        inputs = build_inputs(request, stream=True, module=grpcaio)
        request_id = request_id_of(request)
        return AsyncGrpcStream(self._client, self.model, inputs, request_id, timeout_of(request, self.timeout_s))

    async def infer(self, request: GenerationRequest) -> GenerationResult:
        inputs = build_inputs(request, stream=False, module=grpcaio)
        request_id = request_id_of(request)
        sent_s = time.perf_counter()
        try:
            result = await self._client.infer(
                self.unary_model, inputs, request_id=request_id, client_timeout=timeout_of(request, self.timeout_s)
            )
        except Exception as e:
            raise to_client_error(e) from e
        return single_result(_chunk_from_result(result), sent_s, request_id)

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready()) and bool(await self._client.is_model_ready(self.model))
        except Exception:
            return False

    async def close(self) -> None:
        await self._client.close()


def _map_http_error(e: BaseException) -> ClientError:
    if isinstance(e, ClientError):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return Timeout(f"no response from server in time: {e}")
    return ConnectionFailed(f"connection failed: {e}")


class AsyncHttpStream(_AsyncStreamBase):
    """One ``generate_stream`` request; the POST is sent on the first ``__anext__``."""

    def __init__(self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], request_id: str,
                 timeout_s: float | None, connect_timeout_s: float) -> None:
        super().__init__(request_id, timeout_s)
        self._session = session
        self._url = url
        self._body = body
        self._connect_timeout_s = connect_timeout_s
        self._response: aiohttp.ClientResponse | None = None
        self._parser = SSEParser()
        self._pending: list[StreamChunk] = []
        self._eof = False

    async def _open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._time_left(), sock_connect=self._connect_timeout_s)
        response = await self._session.post(
            self._url, json=self._body, headers={"Accept": "text/event-stream"}, timeout=timeout
        )
        if response.status != 200:
            body = await response.read()
            response.release()
            raise error_from_body(response.status, body)
        self._response = response

    async def __anext__(self) -> StreamChunk:
        try:
            while not self._done:
                if self._pending:
                    chunk = self._pending.pop(0)
                    self._builder.add(chunk)
                    return chunk
                if self._eof:
                    self._finish(clean=True)
                    break
                if self._response is None:
                    await self._open()
                    continue
                data = await asyncio.wait_for(self._response.content.readany(), self._time_left())
                now = time.perf_counter()
                events = self._parser.feed(data) if data else self._parser.close()
                self._eof = not data
                for event in events:
                    chunk = chunk_from_event(event, now)
                    if chunk is not None:
                        self._pending.append(chunk)
        except asyncio.CancelledError:
            self.cancel()
            raise
        except ClientError:
            self._finish(clean=False)
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            if self._cancelled:
                raise StopAsyncIteration from None
            self._finish(clean=False)
            raise _map_http_error(e) from e
        raise StopAsyncIteration

    def _finish(self, *, clean: bool) -> None:
        if not self._done:
            self._done = True
            self._end_s = time.perf_counter()
            if self._response is not None:
                if clean:
                    self._response.release()
                else:
                    self._response.close()

    def cancel(self) -> None:
        if self._done:
            return
        self._cancelled = True
        self._finish(clean=False)


class AsyncHttpClient(_AsyncClient):
    """asyncio client over Triton's HTTP generate extension (one aiohttp session)."""

    def __init__(
        self,
        url: str = DEFAULT_HTTP_URL,
        *,
        model: str = "dsv4",
        timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        max_connections: int = 100,
    ) -> None:
        endpoint = parse_url(url, "http")
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._base = endpoint.address
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # created lazily: a session must be made inside the running event loop
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    def _url(self, endpoint: str) -> str:
        return f"{self._base}/v2/models/{quote(self.model, safe='')}/{endpoint}"

    def stream(self, request: GenerationRequest) -> AsyncHttpStream:
        request_id = request_id_of(request)
        body = {"id": request_id, **request.input_values(stream=True)}
        return AsyncHttpStream(self._get_session(), self._url("generate_stream"), body, request_id,
                               timeout_of(request, self.timeout_s), self.connect_timeout_s)

    async def infer(self, request: GenerationRequest) -> GenerationResult:
        request_id = request_id_of(request)
        body = {"id": request_id, **request.input_values(stream=False)}
        timeout = timeout_of(request, self.timeout_s)
        sent_s = time.perf_counter()
        try:
            async with self._get_session().post(
                self._url("generate"), json=body,
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=self.connect_timeout_s),
            ) as response:
                data = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _map_http_error(e) from e
        return result_from_body(status, data, sent_s, request_id, time.perf_counter())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
