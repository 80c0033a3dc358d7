"""32 concurrent requests against a decode pool that holds only 3: all wait their turn, none fail,
each produces the tokens it produces alone, and afterwards no block is in use."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import generate
from dsv4.backend.sampler import SamplingParams
from dsv4.backend.tokenizer import TextCodec

from .calls import grpc_stream, metric
from .conftest import start


@pytest.fixture(scope="module")
def small_pool_server(tiny_dir, tmp_path_factory):
    server = start(tiny_dir, tmp_path_factory.mktemp("small_pool"), ["--max-sequences", "3", "--kv-cache-gib", "0.05"])
    yield server
    server.stop()


def test_thirty_two_requests_through_a_small_pool_match_each_alone(small_pool_server, tiny_dir):
    jobs = [(f"job {i} " + "token " * (13 * i % 97), 4 + (7 * i) % 29) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda j: grpc_stream(small_pool_server.grpc_url, j[0], max_tokens=j[1], temperature=0.0), jobs))
    model, codec = load_model(tiny_dir, progress=False), TextCodec.load(tiny_dir)
    for (prompt, n), reply in zip(jobs, replies):
        assert reply.error is None, reply.error
        assert reply.ids == generate(model, codec.encode(prompt), SamplingParams(temperature=0.0, max_tokens=n)).token_ids
    time.sleep(0.5)
    url = small_pool_server.metrics_url
    assert metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:num_requests_waiting") == 0
    text = urllib.request.urlopen(url).read().decode()
    used = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("dsv4_kv_blocks_used{"))
    assert used == 0
