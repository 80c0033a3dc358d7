"""dsv4-health notices a dead decode stub or a dead server; KV exhaustion queues or refuses, never crashes."""

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
from ..server_fixtures import start, start_serve


def _ready_code(url: str) -> str:
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/v2/health/ready"],
                          capture_output=True, text=True).stdout


def _unhealthy_within(url: str, seconds: float) -> str:
    since = time.monotonic()
    while True:
        ok, message = probe(url, timeout=5)
        if not ok:
            return message
        assert time.monotonic() - since < seconds, f"probe still healthy {seconds} s after the failure"
        time.sleep(0.5)


def test_health_fails_within_ten_seconds_of_a_stub_or_the_server_dying(tiny_dir, tmp_path):
    serve = start_serve(tiny_dir, tmp_path / "srv")
    try:
        assert health_main(["--url", serve.http_url, "--quiet"]) == 0
        assert _ready_code(serve.http_url) == "200"
        stub = subprocess.run(["pgrep", "-f", f"{tmp_path}/srv/models/decode/1/model.py"], capture_output=True, text=True)
        os.kill(int(stub.stdout.split()[0]), signal.SIGKILL)
        killed = time.monotonic()
        message = _unhealthy_within(serve.http_url, 10)
        assert time.monotonic() - killed < 10
        assert "not healthy" in message or "no answer" in message, message
        assert health_main(["--url", serve.http_url, "--timeout", "3"]) == 1
        # Triton itself still reports ready: that is why the probe runs a real inference
        assert _ready_code(serve.http_url) == "200"
        # tritonserver itself dying (as a stack overflow would make it): dsv4-serve says so and exits 3
        os.kill(serve.tritonserver_pid(), signal.SIGSEGV)
        assert "no answer" in _unhealthy_within(serve.http_url, 10)
        assert serve.proc.wait(30) == 3
        output = serve.proc.stdout.read()
        assert "tritonserver died (signal SIGSEGV)" in output and "tritonserver.log" in output, output
        time.sleep(3)  # the stubs' watchdogs notice within a second or two
        left = subprocess.run(["pgrep", "-af", f"{tmp_path}/srv"], capture_output=True, text=True).stdout
        assert [line for line in left.splitlines() if "pgrep" not in line] == []
    finally:
        if serve.proc.poll() is None:
            serve.proc.terminate()
            serve.proc.wait(60)


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
