"""Synchronous gRPC client: streaming over ``ModelStreamInfer``, unary ``infer`` on ``dsv4_unary``.

One :class:`GrpcClient` owns one channel and at most one open bidirectional stream, reused by
consecutive requests. It serves one request at a time: use one client per thread (or per Locust
user) for concurrency. Cancelling a request closes the stream with ``cancel_requests=True``
(Triton then cancels the request server-side); the next request opens a new stream on the same
channel.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .transport import (
    DEFAULT_GRPC_URL,
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
    error_from_code,
    error_from_grpc_status,
)

__all__ = ["GrpcClient", "GrpcStream", "build_inputs", "to_client_error"]

_DTYPES = {
    "text_input": ("BYTES", np.object_),
    "stop_words": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "min_tokens": ("INT32", np.int32),
    "top_k": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "seed": ("UINT64", np.uint64),
    "stream": ("BOOL", np.bool_),
    "exclude_input_in_output": ("BOOL", np.bool_),
    "apply_chat_template": ("BOOL", np.bool_),
}
# how long one blocking wait may last, so Ctrl-C and cancel() are noticed promptly
_POLL_S = 0.25


def build_inputs(request: GenerationRequest, *, stream: bool, module: Any = grpcclient) -> list[Any]:
    """The request as ``InferInput`` objects (``module`` is tritonclient.grpc or tritonclient.grpc.aio)."""
    inputs = []
    for name, value in request.input_values(stream=stream).items():
        datatype, np_dtype = _DTYPES[name]
        if np_dtype is np.object_:
            items = value if isinstance(value, list) else [value]
            array = np.array([s.encode("utf-8") for s in items], dtype=np.object_)
        else:
            array = np.array([value], dtype=np_dtype)
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def to_client_error(error: BaseException) -> ClientError:
    """Any error from tritonclient's gRPC clients (blocking or asyncio) as a ``ClientError``."""
    if isinstance(error, ClientError):
        return error
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return error_from_code(error.code().name, error.details() or str(error))
    if isinstance(error, InferenceServerException):
        return error_from_grpc_status(error.status(), error.message() or str(error))
    return ConnectionFailed(str(error))


_OPEN_CLIENTS: weakref.WeakSet[GrpcClient] = weakref.WeakSet()


def _close_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        client.close()


# tritonclient's stream reader is a non-daemon thread: a client left open would keep the
# interpreter from exiting, so close open clients before Python joins its threads
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_close_open_clients)


def _is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


class GrpcStream(StreamState):
    """Chunks of one streaming request. Iterate it; ``cancel()`` from any thread stops it.

    Iteration ends after the response flagged final. ``result()`` drains what is left and
    returns the assembled :class:`GenerationResult`.
    """

    def __init__(self, owner: GrpcClient, request_id: str, sent_s: float, deadline_s: float | None) -> None:
        super().__init__(request_id, sent_s, deadline_s)
        self._owner = owner
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue()

    def _deliver(self, result: Any, error: Any) -> None:
        self._queue.put((result, error))

    def _delivered_error(self) -> Any:
        try:
            while (item := self._queue.get(timeout=0.5)) is not None:
                if item[1] is not None:
                    return item[1]
        except queue.Empty:
            pass
        return None

    def __iter__(self) -> GrpcStream:
        return self

    def __next__(self) -> StreamChunk:
        while not self._done:
            item = self._wait()
            if item is None:  # woken by cancel()
                continue
            result, error = item
            now = time.perf_counter()
            if error is not None:
                self._finish(now, broken=True)
                raise to_client_error(error)
            chunk = chunk_from_tensors(result.as_numpy, now)
            if _is_final(result):
                self._finish(now, broken=False)
            if chunk is not None:
                self._builder.add(chunk)
                return chunk
        raise StopIteration

    def _wait(self) -> tuple[Any, Any] | None:
        while True:
            remaining = self._time_left()
            wait = _POLL_S if remaining is None else min(_POLL_S, remaining)
            try:
                return self._queue.get(timeout=wait)
            except queue.Empty:
                continue

    def _finish(self, end_s: float, *, broken: bool) -> None:
        if not self._done:
            self._done = True
            self._end_s = end_s
            self._owner._release(self.request_id, broken=broken)

    def cancel(self) -> None:
        """Stop the request; Triton cancels it server-side. Safe to call twice or after the end."""
        if self._done:
            return
        self._cancelled = True
        self._finish(time.perf_counter(), broken=True)
        self._queue.put(None)

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> GrpcStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # an abandoned stream must not keep the client busy
        try:
            self.cancel()
        except Exception:
            pass

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        # the end is the final response's arrival, which may come after the last chunk
        return self._build(self._end_s)


class GrpcClient:
    """Blocking client for the ``dsv4`` ensemble over Triton gRPC.

    ``url`` is ``host:port`` or ``grpc://host:port``. ``timeout_s`` is the default client-side
    deadline of a whole request (``GenerationRequest.timeout_s`` overrides it).
    """

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
        self._client = grpcclient.InferenceServerClient(endpoint.address, verbose=verbose, ssl=endpoint.ssl)
        self._lock = threading.RLock()
        # weak, so that a stream the caller dropped is collected and cancels itself
        self._active_ref: weakref.ref[GrpcStream] | None = None
        self._active_id: str | None = None
        self._stream_open = False

    # stream management -------------------------------------------------------------------

    def _on_response(self, result: Any = None, error: Any = None) -> None:
        ref = self._active_ref
        active = ref() if ref is not None else None
        if active is None:
            return
        if result is not None and result.get_response().id not in ("", active.request_id):
            return
        active._deliver(result, error)

    def _release(self, request_id: str, *, broken: bool) -> None:
        with self._lock:
            if self._active_id != request_id:
                return
            self._active_id = None
            self._active_ref = None
            if broken and self._stream_open:
                self._stream_open = False
                self._close_stream(cancel=True)

    def _close_stream(self, *, cancel: bool) -> None:
        try:
            self._client.stop_stream(cancel_requests=cancel)
        except Exception:
            pass

    def stream(self, request: GenerationRequest) -> GrpcStream:
        """Send ``request`` with ``stream=true`` and return its chunk iterator."""
        request_id = request_id_of(request)
        inputs = build_inputs(request, stream=True)
        timeout = timeout_of(request, self.timeout_s)
        with self._lock:
            if self._active_id is not None:
                raise RuntimeError("GrpcClient serves one request at a time; use one client per thread")
            sent_s = time.perf_counter()
            stream = GrpcStream(self, request_id, sent_s, None if timeout is None else sent_s + timeout)
            self._active_id = request_id
            self._active_ref = weakref.ref(stream)
            try:
                if not self._stream_open:
                    self._client.start_stream(callback=self._on_response)
                    self._stream_open = True
                    _OPEN_CLIENTS.add(self)
                self._client.async_stream_infer(
                    self.model, inputs, request_id=request_id, enable_empty_final_response=True
                )
            except Exception as e:
                self._active_id = None
                self._active_ref = None
                stream._done = True
                if self._stream_open:
                    self._stream_open = False
                    self._close_stream(cancel=True)
                # a dead stream reports its cause through the callback; prefer it to the generic error
                cause = stream._delivered_error()
                raise to_client_error(cause if cause is not None else e) from e
        return stream

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Stream ``request`` and return the assembled result (with TTFT and token times)."""
        return self.stream(request).result()

    def infer(self, request: GenerationRequest) -> GenerationResult:
        """One unary ``ModelInfer`` call on the non-decoupled model (``stream=false``)."""
        request_id = request_id_of(request)
        timeout = timeout_of(request, self.timeout_s)
        inputs = build_inputs(request, stream=False)
        sent_s = time.perf_counter()
        try:
            result = self._client.infer(self.unary_model, inputs, request_id=request_id, client_timeout=timeout)
        except Exception as e:
            raise to_client_error(e) from e
        return single_result(chunk_from_tensors(result.as_numpy, time.perf_counter()), sent_s, request_id)

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready()) and bool(self._client.is_model_ready(self.model))
        except Exception:
            return False

    def close(self) -> None:
        ref = self._active_ref
        active = ref() if ref is not None else None
        if active is not None:
            active.cancel()
        with self._lock:
            if self._stream_open:
                self._stream_open = False
                self._close_stream(cancel=True)
        _OPEN_CLIENTS.discard(self)
        self._client.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

