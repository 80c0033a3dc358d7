"""Cancelling a gRPC stream stops generation within a couple of decode steps and frees its state."""

from __future__ import annotations

import queue
import time

import tritonclient.grpc as grpcclient

from .calls import grpc_inputs, grpc_stream, metric


def _wait_idle(server, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while metric(server.metrics_url, "dsv4_decode_active_requests") != 0:
        assert time.monotonic() < end, "decode still holds requests"
        time.sleep(0.1)


def test_cancelled_stream_stops_and_frees_decode_state(server):
    _wait_idle(server)
    generated_before = metric(server.metrics_url, "vllm:generation_tokens_total")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("dsv4", grpc_inputs("cancel me", stream=True, max_tokens=1000, temperature=0.0))
    received = 0
    while received < 5:
        result, error = responses.get(timeout=60)
        assert error is None
        received += len(result.as_numpy("output_ids"))
    client.stop_stream(cancel_requests=True)
    client.close()
    _wait_idle(server)
    time.sleep(0.3)  # counters are published every 0.1 s
    generated = metric(server.metrics_url, "vllm:generation_tokens_total") - generated_before
    # tokens already produced when the cancel arrived, plus at most two more decode steps
    print(f"received {received} tokens before cancelling; decode generated {generated}")
    assert received <= generated <= received + 2 + responses.qsize(), (received, generated)
    assert generated < 100
    # and the server is unaffected
    reply = grpc_stream(server.grpc_url, "after cancel", max_tokens=4, temperature=0.0)
    assert reply.error is None and len(reply.ids) == 4
