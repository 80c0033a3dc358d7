"""A real tritonserver (from the nvidia-pytriton wheel) on free loopback ports."""

from __future__ import annotations

import pytest

from dsv4.backend.checkpoint.writer import write_checkpoint
from dsv4.backend.presets import preset
from dsv4.scripts.serve import device_defaults, launch, parse_args
from dsv4.scripts.triton_launcher import free_ports, wait_ready

MAX_MODEL_LEN = 2048


def start(model_dir, work, extra: list[str] = ()):
    http, grpc, metrics = free_ports(3)
    args = parse_args(["--model", str(model_dir), "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                       str(metrics), "--max-model-len", str(MAX_MODEL_LEN), "--max-tokens-limit", "1024",
                       "--tokenizer-instances", "1", "--unary-instances", "2", *extra])
    device_defaults(args)
    server = launch(args, model_dir, work)
    try:
        wait_ready(server, 300)
    except Exception:
        server.stop(5)
        raise
    return server


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0, progress=False)


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory):
    srv = start(tiny_dir, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()
