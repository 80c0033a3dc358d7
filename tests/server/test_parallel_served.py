"""`dsv4-serve --tensor-parallel 2 --expert-parallel 2` against the real tritonserver on the CPU: each
stage's Triton instance is rank 0 of two processes (the other follows its calls), and the served
greedy tokens equal the one-process server's, alone and for streams decoded together; a cancelled
stream frees every block on every rank; a follower that dies makes the stage refuse requests
clearly (so the canary, and health, fail) instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .calls import cancel_after_chunks, grpc_stream, grpc_streams_together, metric, wait_idle

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


BUSY = ("vllm:num_requests_running", "dsv4_prefill_requests")


def test_each_stage_runs_on_two_ranks(parallel):
    assert len(_followers("decode")) == 1 and len(_followers("prefill")) == 1


def test_same_greedy_tokens_as_one_process_alone_and_together(server, parallel):
    want = {p: grpc_stream(server.grpc_url, p, max_tokens=N, temperature=0.0) for p in PROMPTS}
    for p in PROMPTS[:2]:
        got = grpc_stream(parallel.grpc_url, p, max_tokens=N, temperature=0.0)
        assert got.error is None and (got.ids, got.text) == (want[p].ids, want[p].text), p
    together = grpc_streams_together(parallel.grpc_url, PROMPTS, max_tokens=N, temperature=0.0)
    for p in PROMPTS:  # decoded in shared steps on both ranks
        assert together[p].error is None and together[p].ids == want[p].ids, p


def test_a_cancelled_stream_leaves_nothing_held(parallel):
    cancel_after_chunks(parallel.grpc_url, "cancel me", 3)
    wait_idle(parallel, BUSY, timeout=20.0)
    assert metric(parallel.metrics_url, "dsv4_kv_blocks_used") == 0
    again = grpc_stream(parallel.grpc_url, "still serving", max_tokens=3, temperature=0.0)
    assert again.error is None and len(again.ids) == 3


def test_a_dead_follower_fails_requests_clearly(parallel):
    (pid,) = _followers("decode")
    os.kill(pid, signal.SIGKILL)
    time.sleep(2.5)  # the stage notices within a second
    reply = grpc_stream(parallel.grpc_url, "after the crash", max_tokens=3, temperature=0.0, timeout=60)
    assert reply.error is not None and "rank 1 exited" in reply.error, reply.error
