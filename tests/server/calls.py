"""Thin calls to a running server through tritonclient and plain HTTP (what a user would write)."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from dsv4.client.http_client import SSEParser


@dataclass
class Reply:
    ids: list[int] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    finish_reason: str = ""
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def grpc_inputs(prompt, **params) -> list:
    values = {"text_input": np.array([prompt if isinstance(prompt, bytes) else prompt.encode()], dtype=np.object_)}
    types = {"max_tokens": np.int32, "min_tokens": np.int32, "top_k": np.int32, "temperature": np.float32, "top_p": np.float32,
             "seed": np.uint64, "stream": bool, "exclude_input_in_output": bool, "apply_chat_template": bool}
    for name, value in params.items():
        if name == "stop_words":
            values[name] = np.array([s.encode() for s in value], dtype=np.object_)
        elif isinstance(value, np.ndarray):
            values[name] = value
        else:
            values[name] = np.array([value], dtype=types[name])
    out = []
    for name, arr in values.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _absorb(reply: Reply, result) -> bool:
    reply.ids += result.as_numpy("output_ids").tolist()
    reply.chunks.append(result.as_numpy("text_output")[0].decode())
    reply.finish_reason = result.as_numpy("finish_reason")[0].decode()
    reply.num_output_tokens = int(result.as_numpy("num_output_tokens")[0])
    return bool(reply.finish_reason)


def grpc_stream(url: str, prompt, timeout: float = 120, **params) -> Reply:
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    reply = Reply()
    try:
        client.async_stream_infer("dsv4", grpc_inputs(prompt, stream=True, **params))
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                reply.error = str(error)
                break
            if _absorb(reply, result):
                break
    finally:
        client.stop_stream()
        client.close()
    return reply


def grpc_unary(url: str, prompt, **params) -> Reply:
    client = grpcclient.InferenceServerClient(url)
    reply = Reply()
    try:
        _absorb(reply, client.infer("dsv4_unary", grpc_inputs(prompt, **params)))
    except InferenceServerException as exc:
        reply.error = str(exc)
    finally:
        client.close()
    return reply


def http_post(url: str, path: str, body: dict | bytes, timeout: float = 120,
              content_type: str = "application/json") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_generate(url: str, prompt: str, model: str = "dsv4", **params) -> tuple[int, dict]:
    status, body = http_post(url, f"/v2/models/{model}/generate", {"text_input": prompt, **params})
    return status, json.loads(body)


def http_stream(url: str, prompt: str, **params) -> Reply:
    status, body = http_post(url, "/v2/models/dsv4/generate_stream", {"text_input": prompt, "stream": True, **params})
    reply = Reply()
    parser = SSEParser()
    for sse in parser.feed(body) + parser.close():
        event = json.loads(sse.data)
        if "error" in event:
            reply.error = event["error"]
            break
        ids = event["output_ids"]
        reply.ids += ids if isinstance(ids, list) else [ids]
        reply.chunks.append(event["text_output"])
        reply.finish_reason = event["finish_reason"]
        reply.num_output_tokens = event["num_output_tokens"]
    return reply


def metric(metrics_url: str, name: str) -> float:
    """Sum of every sample of one metric family on the metrics port."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    if not seen:
        raise KeyError(f"metric {name} not exported")
    return total


def wait_idle(server, gauges: tuple[str, ...] = ("vllm:num_requests_running",), timeout: float = 15.0) -> None:
    """Until every gauge reads 0, then one more publication period (gauges are published every 0.1 s)."""
    end = time.monotonic() + timeout
    while any(metric(server.metrics_url, name) for name in gauges):
        assert time.monotonic() < end, f"the server still holds requests ({', '.join(gauges)})"
        time.sleep(0.1)
    time.sleep(0.3)


def grpc_streams_together(url: str, prompts: list[str], timeout: float = 180, **params) -> dict[str, Reply]:
    """Each prompt on its own stream, all released at once (a barrier), so the server takes them together."""
    replies: dict[str, Reply] = {}
    barrier = threading.Barrier(len(prompts))

    def call(prompt):
        barrier.wait()
        replies[prompt] = grpc_stream(url, prompt, **params)

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return replies


def cancel_after_chunks(url: str, prompt: str, chunks: int) -> None:
    """Stream a long generation, read `chunks` responses (none may be an error), then cancel the stream."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("dsv4", grpc_inputs(prompt, stream=True, max_tokens=1000, temperature=0.0))
    for _ in range(chunks):
        _, error = responses.get(timeout=60)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()
