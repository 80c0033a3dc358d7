"""A real tritonserver (from the nvidia-pytriton wheel) on free loopback ports."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class ServeProcess:
    """dsv4-serve run as a user runs it, on free loopback ports."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    work: Path
    banner: str

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def tritonserver_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"tritonserver --model-repository={self.work}"], capture_output=True, text=True)
        return int(out.stdout.split()[0])


def start_serve(model_dir, work: Path, extra: list[str] = ()) -> ServeProcess:
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "dsv4.scripts.serve", "--model", str(model_dir), "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics), "--max-model-len", str(MAX_MODEL_LEN), "--max-tokens-limit", "1024",
           "--tokenizer-instances", "1", "--unary-instances", "2", "--workdir", str(work), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    for line in proc.stdout:
        banner.append(line)
        if "Ctrl-C stops" in line or "did not come up" in line:
            break
    assert proc.poll() is None, "".join(banner)
    return ServeProcess(proc, http, grpc, metrics, work, "".join(banner))
