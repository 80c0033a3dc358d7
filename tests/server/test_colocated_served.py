"""`dsv4-serve --stage-layout colocated` (prefill inside decode's process; the default on a GPU) against
the real tritonserver on the CPU: the same greedy tokens as the split layout over gRPC streaming,
unary gRPC and HTTP, prompts arriving together prefilled in shared passes, bad input still
INVALID_ARG, a cancelled stream freed, and prefill's metrics exported by decode."""

from __future__ import annotations

import pytest

from .calls import (cancel_after_chunks, grpc_stream, grpc_streams_together, grpc_unary, http_generate, metric,
                    wait_idle)

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,"]
N = 10


@pytest.fixture(scope="module")
def colocated(tiny_dir, tmp_path_factory):
    from ..server_fixtures import start

    srv = start(tiny_dir, tmp_path_factory.mktemp("colocated"), ["--stage-layout", "colocated"])
    yield srv
    srv.stop()


BUSY = ("vllm:num_requests_running", "dsv4_prefill_requests")


def test_same_greedy_tokens_as_the_split_layout(server, colocated):
    for prompt in PROMPTS[:2]:
        want = grpc_stream(server.grpc_url, prompt, max_tokens=N, temperature=0.0)
        got = grpc_stream(colocated.grpc_url, prompt, max_tokens=N, temperature=0.0)
        assert want.error is None and got.error is None, (want.error, got.error)
        assert (got.ids, got.text, got.finish_reason) == (want.ids, want.text, want.finish_reason)
        unary = grpc_unary(colocated.grpc_url, prompt, max_tokens=N, temperature=0.0)
        assert unary.error is None and unary.ids == want.ids
        status, body = http_generate(colocated.http_url, prompt, max_tokens=N, temperature=0.0)
        assert status == 200 and body["text_output"] == prompt + want.text  # non-streamed: prompt included


def test_prompts_arriving_together_share_prefill_passes(server, colocated):
    want = {p: grpc_stream(server.grpc_url, p, max_tokens=N, temperature=0.0) for p in PROMPTS}
    wait_idle(colocated, BUSY, timeout=10.0)
    steps_before = metric(colocated.metrics_url, "dsv4_prefill_steps_total")
    got = grpc_streams_together(colocated.grpc_url, PROMPTS, timeout=120, max_tokens=N, temperature=0.0)
    for p in PROMPTS:
        assert got[p].error is None and got[p].ids == want[p].ids, p
    wait_idle(colocated, BUSY, timeout=10.0)
    steps = metric(colocated.metrics_url, "dsv4_prefill_steps_total") - steps_before
    # four short prompts: one pass each would be four; arriving together they share passes
    assert 1 <= steps < len(PROMPTS), steps


def test_bad_input_is_refused_and_a_cancelled_stream_leaves_nothing_held(colocated):
    bad = grpc_stream(colocated.grpc_url, "hello", max_tokens=0)
    assert bad.error is not None and "max_tokens" in bad.error
    cancel_after_chunks(colocated.grpc_url, "cancel me", 3)
    wait_idle(colocated, BUSY, timeout=10.0)
    assert metric(colocated.metrics_url, "dsv4_kv_blocks_used") == 0
    assert grpc_stream(colocated.grpc_url, "still serving", max_tokens=3, temperature=0.0).error is None
