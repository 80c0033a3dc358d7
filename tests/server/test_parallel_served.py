"""`dsv4-serve --tensor-parallel 2 --expert-parallel 2` against the real tritonserver on the CPU: each
stage's Triton instance is rank 0 of two processes (the other follows its calls), and the served
greedy tokens equal the one-process server's, alone and for streams decoded together; a cancelled
stream frees every block on every rank; a follower that dies makes the stage refuse requests
clearly (so the canary, and health, fail) instead of hanging."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from .calls import grpc_inputs, grpc_stream, metric

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,"]
N = 8


@pytest.fixture(scope="module")
def parallel(tiny_dir, tmp_path_factory):
    from ..server_fixtures import start

    srv = start(tiny_dir, tmp_path_factory.mktemp("parallel"), ["--tensor-parallel", "2", "--expert-parallel", "2"])
    yield srv
    srv.stop()


def _followers(stage: str) -> list[int]:
    """Pids of this machine's follower ranks of `stage` (only this module's server starts any)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "dsv4.backend.parallel.stage_worker" in cmd and f'"stage": "{stage}"' in cmd:
            pids.append(int(entry.name))
    return pids


def _wait_idle(srv, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while metric(srv.metrics_url, "vllm:num_requests_running") or metric(srv.metrics_url, "dsv4_prefill_requests"):
        assert time.monotonic() < end, "the server still holds requests"
        time.sleep(0.1)
    time.sleep(0.3)  # gauges are published every 0.1 s


def test_each_stage_runs_on_two_ranks(parallel):
    assert len(_followers("decode")) == 1 and len(_followers("prefill")) == 1


def test_same_greedy_tokens_as_one_process_alone_and_together(server, parallel):
    want = {p: grpc_stream(server.grpc_url, p, max_tokens=N, temperature=0.0) for p in PROMPTS}
    for p in PROMPTS[:2]:
        got = grpc_stream(parallel.grpc_url, p, max_tokens=N, temperature=0.0)
        assert got.error is None and (got.ids, got.text) == (want[p].ids, want[p].text), p
    together: dict[str, object] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def call(prompt):
        barrier.wait()
        together[prompt] = grpc_stream(parallel.grpc_url, prompt, max_tokens=N, temperature=0.0)

    threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for p in PROMPTS:  # decoded in shared steps on both ranks
        assert together[p].error is None and together[p].ids == want[p].ids, p


def test_a_cancelled_stream_leaves_nothing_held(parallel):
    client = grpcclient.InferenceServerClient(parallel.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("dsv4", grpc_inputs("cancel me", stream=True, max_tokens=1000, temperature=0.0))
    for _ in range(3):
        _, error = responses.get(timeout=60)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    _wait_idle(parallel)
    assert metric(parallel.metrics_url, "dsv4_kv_blocks_used") == 0
    again = grpc_stream(parallel.grpc_url, "still serving", max_tokens=3, temperature=0.0)
    assert again.error is None and len(again.ids) == 3


def test_a_dead_follower_fails_requests_clearly(parallel):
    (pid,) = _followers("decode")
    os.kill(pid, signal.SIGKILL)
    time.sleep(2.5)  # the stage notices within a second
    reply = grpc_stream(parallel.grpc_url, "after the crash", max_tokens=3, temperature=0.0, timeout=60)
    assert reply.error is not None and "rank 1 exited" in reply.error, reply.error
