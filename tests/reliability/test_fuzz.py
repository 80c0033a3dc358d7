"""A short fuzzing round against dsv4-serve (the long one is `make fuzz`), then the shutdown that
Triton 2.51 alone would stall: clients that left gRPC streams open, or dropped a stream whose
request Triton had rejected, must not keep the server from stopping within seconds with exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dsv4.scripts.triton_exit import shm_regions

from .fuzz import MB, Target, passed, run
from ..server_fixtures import start_serve

FUZZ_SECONDS = 50
EXIT_TIMEOUT = 30

# a client that sends max_tokens as FP32 (Triton itself rejects it) and goes away without closing
ABANDONING_CLIENT = """
import os, queue, sys
import numpy as np
import tritonclient.grpc as g
client = g.InferenceServerClient(sys.argv[1])
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put(error))
text = g.InferInput("text_input", [1], "BYTES"); text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
wrong = g.InferInput("max_tokens", [1], "FP32"); wrong.set_data_from_numpy(np.array([2.0], dtype=np.float32))
client.async_stream_infer("dsv4", [text, wrong])
assert "FP32" in str(answers.get(timeout=30))
if sys.argv[2] == "leave":
    os._exit(0)
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def serve(tiny_dir, tmp_path_factory):
    proc = start_serve(tiny_dir, tmp_path_factory.mktemp("fuzz") / "work", ["--exit-timeout", str(EXIT_TIMEOUT)])
    yield proc
    if proc.proc.poll() is None:  # a test failed before the stop test: stop it the normal way
        proc.proc.terminate()
        proc.proc.wait(EXIT_TIMEOUT + 30)


def test_short_fuzz_round(serve):
    target = Target(serve.http_port, serve.grpc_port, serve.metrics_port, alive=lambda: serve.proc.poll() is None)
    result = run(target, FUZZ_SECONDS, cap=18 * MB)
    print(result)
    assert passed(result), result
    assert result["requests"] > 100 and len(result["codes"]) >= 5, result


def test_stop_is_quick_and_clean_with_abandoned_and_open_streams(serve):
    leaver = subprocess.run([sys.executable, "-c", ABANDONING_CLIENT, serve.grpc_url, "leave"], capture_output=True, text=True, timeout=60)
    assert leaver.returncode == 0, leaver.stderr
    holder = subprocess.Popen([sys.executable, "-c", ABANDONING_CLIENT, serve.grpc_url, "hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        regions = shm_regions(serve.tritonserver_pid())
        assert regions
        stopped_at = time.monotonic()
        serve.proc.terminate()
        code = serve.proc.wait(EXIT_TIMEOUT + 30)
        took = time.monotonic() - stopped_at
    finally:
        holder.kill()
    output = serve.proc.stdout.read()
    # Triton alone waits out the whole exit timeout, then blocks while the holder stays
    assert code == 0 and took < 20, (code, took, output)
    assert "client gRPC streams" in output, output
    time.sleep(2)
    left = subprocess.run(["pgrep", "-af", str(serve.work)], capture_output=True, text=True).stdout
    assert [line for line in left.splitlines() if "pgrep" not in line] == []
    assert not [r for r in regions if os.path.exists(r)], "shared memory left behind"
