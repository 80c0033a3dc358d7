"""The paged KV cache under the real server: prefix reuse, metrics, and nothing left held."""

from __future__ import annotations

import re
import time
import urllib.request

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import generate
from dsv4.backend.sampler import SamplingParams
from dsv4.backend.tokenizer import TextCodec

from .calls import grpc_stream, metric, wait_idle

SHARED = " ".join(f"Section {i}: the quick brown fox number {i * 7 % 13} jumps over lazy dog {i % 5}." for i in range(110))


def _prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def test_shared_prefix_hits_the_cache_skips_prefill_and_matches_a_cold_run(server, tiny_dir):
    codec = TextCodec.load(tiny_dir)
    first, second = SHARED + " First question: why?", SHARED + " Second, unrelated question: how?"
    ids_first, ids_second = codec.encode(first), codec.encode(second)
    assert _prefix_len(ids_first, ids_second) >= 1024 + 8
    wait_idle(server, IN_FLIGHT)
    m = lambda name: metric(server.metrics_url, name)  # noqa: E731
    hits, hit_tokens, computed = m("dsv4_prefix_cache_hits_total"), m("dsv4_prefix_cache_hit_tokens_total"), m("dsv4_prefill_computed_tokens_total")

    start = time.perf_counter()
    cold = grpc_stream(server.grpc_url, first, max_tokens=8, temperature=0.0)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = grpc_stream(server.grpc_url, second, max_tokens=8, temperature=0.0)
    warm_s = time.perf_counter() - start
    wait_idle(server, IN_FLIGHT)
    assert cold.error is None and warm.error is None
    assert m("dsv4_prefix_cache_hits_total") == hits + 1
    assert m("dsv4_prefix_cache_hit_tokens_total") - hit_tokens >= 1024
    ran = m("dsv4_prefill_computed_tokens_total") - computed
    assert ran <= len(ids_first) + len(ids_second) - 1024
    print(f"prefill ran {ran:.0f} of {len(ids_first) + len(ids_second)} prompt tokens; "
          f"cold request {cold_s * 1000:.0f} ms, prefix hit {warm_s * 1000:.0f} ms")
    # the resumed request computes exactly what a cold run computes
    model = load_model(tiny_dir, progress=False)
    assert warm.ids == generate(model, ids_second, SamplingParams(temperature=0.0, max_tokens=8)).token_ids
    assert cold.ids == generate(model, ids_first, SamplingParams(temperature=0.0, max_tokens=8)).token_ids


def test_kv_metrics_are_exported_and_return_to_zero_when_idle(server):
    reply = grpc_stream(server.grpc_url, "metrics please", max_tokens=6, temperature=0.0)
    assert reply.error is None
    wait_idle(server, IN_FLIGHT)
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    for name in ("dsv4_kv_blocks_used", "dsv4_kv_blocks_free", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:time_to_first_token_seconds_bucket", "dsv4_prefix_cache_hits_total"):
        assert name in text, name
    used = [line for line in text.splitlines() if line.startswith("dsv4_kv_blocks_used{")]
    pools = set(re.findall(r'pool="(\w+)"', "\n".join(used)))
    assert {"swa", "csa_kv", "csa_index", "hca_kv", "state"} <= pools
    assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in used), used
