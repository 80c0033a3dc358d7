"""dsv4-health notices a dead decode stub; KV exhaustion queues or refuses, never crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import generate
from dsv4.backend.sampler import SamplingParams
from dsv4.backend.tokenizer import TextCodec
from dsv4.scripts.health import main as health_main
from dsv4.scripts.health import probe

from ..server.calls import grpc_stream, metric
from ..server_fixtures import start


def test_health_probe_fails_within_ten_seconds_of_the_decode_stub_dying(tiny_dir, tmp_path):
    server = start(tiny_dir, tmp_path / "srv")
    try:
        assert health_main(["--url", server.http_url, "--quiet"]) == 0
        ready = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{server.http_url}/v2/health/ready"],
                               capture_output=True, text=True).stdout
        assert ready == "200"
        stub = subprocess.run(["pgrep", "-f", f"{tmp_path}/srv/models/decode/1/model.py"], capture_output=True, text=True)
        pid = int(stub.stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            ok, message = probe(server.http_url, timeout=5)
            if not ok:
                break
            assert time.monotonic() - killed < 10, "probe still healthy 10 s after the stub died"
            time.sleep(0.5)
        assert time.monotonic() - killed < 10
        assert "not healthy" in message or "no answer" in message, message
        assert health_main(["--url", server.http_url, "--timeout", "3"]) == 1
        # Triton itself still reports ready: that is why the probe runs a real inference
        ready = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{server.http_url}/v2/health/ready"],
                               capture_output=True, text=True).stdout
        assert ready == "200"
    finally:
        server.stop(20)


@pytest.fixture(scope="module")
def tight_server(tiny_dir, tmp_path_factory):
    server = start(tiny_dir, tmp_path_factory.mktemp("tight"), ["--max-sequences", "2", "--max-waiting", "3"])
    yield server
    server.stop()


def test_demand_far_beyond_the_pool_waits_or_gets_unavailable(tight_server, tiny_dir):
    jobs = [(f"pressure {i} " + "w " * (i % 17), 30 + i % 11) for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda j: grpc_stream(tight_server.grpc_url, j[0], max_tokens=j[1], temperature=0.0), jobs))
    refused = [r for r in replies if r.error is not None]
    served = [(j, r) for j, r in zip(jobs, replies) if r.error is None]
    assert refused and served, (len(refused), len(served))
    for r in refused:
        assert "server is full" in r.error and "try again later" in r.error, r.error
    model, codec = load_model(tiny_dir, progress=False), TextCodec.load(tiny_dir)
    for (prompt, n), reply in served:
        assert reply.ids == generate(model, codec.encode(prompt), SamplingParams(temperature=0.0, max_tokens=n)).token_ids
    time.sleep(0.5)
    assert metric(tight_server.metrics_url, "dsv4_kv_blocks_used") == 0
    assert probe(tight_server.http_url, timeout=10)[0]
