"""Start the real `tritonserver` from the nvidia-pytriton wheel on a generated model repository.

Used by `dsv4-serve` and by the end-to-end test fixtures. The Python backend stub embeds one
Python version and takes its packages from the `python3` first on PATH, so this process's own
interpreter directory goes first on the server's PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dsv4.scripts import server_metrics
from dsv4.scripts.stack_limit import StackLimit, current_plan, stack_limit_for_children
from dsv4.scripts.triton_exit import wait_for_exit

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(os.environ.get("DSV4_MODEL_REPOSITORY", REPO_ROOT / "model_repository"))


class LaunchError(RuntimeError):
    """The server could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class TritonBundle:
    server: Path
    backend_dir: Path  # holds libtriton_python.so and triton_python_backend_utils.py
    stub: Path
    libs: Path | None

    @classmethod
    def locate(cls) -> TritonBundle:
        """The binary, Python backend and stub for this Python (env vars override, as on the GPU bundle)."""
        env = os.environ
        spec = importlib.util.find_spec("pytriton")
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" if spec else None
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        server = Path(env["TRITONSERVER"]) if "TRITONSERVER" in env else (root / "bin" / "tritonserver" if root else None)
        backend = Path(env["TRITON_PYTHON_BACKEND_DIR"]) if "TRITON_PYTHON_BACKEND_DIR" in env else (root / "backends" / "python" if root else None)
        stub = Path(env["TRITON_BACKEND_STUB"]) if "TRITON_BACKEND_STUB" in env else (root / "python_backend_stubs" / version / "triton_python_backend_stub" if root else None)
        for what, path in (("tritonserver binary", server), ("Python backend", backend), (f"backend stub for Python {version}", stub)):
            if path is None or not path.exists():
                raise LaunchError(f"{what} not found ({path}); install nvidia-pytriton==0.7.0 (make serve does)")
        # the wheel's libraries serve the wheel's binary only: another server (TRITONSERVER) brings its own
        libs = root.parent.parent / "nvidia_pytriton.libs" if root and "TRITONSERVER" not in env else None
        return cls(server, backend, stub, libs if libs and libs.is_dir() else None)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


SPLIT_MODELS = ("dsv4", "tokenizer", "prefill", "decode", "stream_guard", "dsv4_unary")
COLOCATED_MODELS = ("dsv4", "tokenizer", "decode", "stream_guard", "dsv4_unary")


def build_repository(out: Path, values: dict[str, str], models: tuple[str, ...] = SPLIT_MODELS,
                     variant: str | None = None) -> Path:
    """Copy the model repository templates, filling every `${name}` in the config files.

    `variant`: a model with a `config.<variant>.pbtxt` uses that file as its config (the ensemble
    of the colocated layout); other variants' files are not copied."""
    if out.exists():
        shutil.rmtree(out)
    for name in models:
        shutil.copytree(TEMPLATES / name, out / name, ignore=shutil.ignore_patterns("__pycache__", "config.*.pbtxt"))
        config = out / name / "config.pbtxt"
        chosen = TEMPLATES / name / f"config.{variant}.pbtxt"
        source = chosen if variant and chosen.is_file() else config
        text = string.Template(source.read_text()).safe_substitute(values)
        if "${" in text:
            missing = sorted({part.split("}")[0] for part in text.split("${")[1:]})
            raise LaunchError(f"{config}: no value for {missing}")
        config.write_text(text)
    return out


def build_backend_dir(out: Path, bundle: TritonBundle) -> Path:
    """backends/python with the library, the utils module and the stub matching this Python."""
    python = out / "python"
    if python.exists():
        shutil.rmtree(python)
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(bundle.backend_dir / name)
    shutil.copy2(bundle.stub, python / "triton_python_backend_stub")
    return out


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = 30
    shm_bytes: int = 64 << 20
    cuda_pool_bytes: int = 0
    cuda_pool_gpus: tuple[int, ...] = (0,)  # the GPUs the stages run on: each gets a pool
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()


def server_command(bundle: TritonBundle, repo: Path, backends: Path, opts: ServerOptions) -> list[str]:
    cmd = [
        str(bundle.server), f"--model-repository={repo}", f"--backend-directory={backends}",
        "--model-control-mode=none", "--strict-readiness=true", "--log-verbose=0", "--metrics-interval-ms=250",
        f"--http-address={opts.host}", f"--http-port={opts.http_port}",
        f"--grpc-address={opts.host}", f"--grpc-port={opts.grpc_port}",
        f"--metrics-address={opts.host}", f"--metrics-port={opts.metrics_port}",
        f"--exit-timeout-secs={opts.exit_timeout_s}",
        f"--backend-config=python,shm-default-byte-size={opts.shm_bytes}",
        f"--backend-config=python,shm-growth-byte-size={opts.shm_bytes}",
        "--backend-config=python,stub-timeout-seconds=120",
    ]
    if opts.cuda_pool_bytes:
        cmd += [f"--cuda-memory-pool-byte-size={gpu}:{opts.cuda_pool_bytes}" for gpu in opts.cuda_pool_gpus]
    if opts.api_key:
        # beyond loopback: model-repository and shared-memory APIs need the key
        for api in ("model-repository", "shared-memory"):
            cmd.append(f"--http-restricted-api={api}:dsv4-api-key={opts.api_key}")
            cmd.append(f"--grpc-restricted-protocol={api}:dsv4-api-key={opts.api_key}")
    return cmd + list(opts.extra_args)


def server_env(bundle: TritonBundle) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if bundle.libs:
        env["LD_LIBRARY_PATH"] = f"{bundle.libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    # few malloc arenas: with one per thread, tritonserver's resident memory creeps up under load
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


class RunningServer:
    """A started tritonserver process; `stop()` sends SIGTERM and waits for the graceful exit."""

    def __init__(self, proc: subprocess.Popen, opts: ServerOptions, log_path: Path, stack: StackLimit):
        self.proc, self.opts, self.log_path, self.stack = proc, opts, log_path, stack
        # set when stop() had to end a tritonserver that only client gRPC streams kept alive
        self.ended_held_by_streams = False

    @property
    def http_url(self) -> str:
        return f"http://{_connect_host(self.opts.host)}:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.opts.host)}:{self.opts.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_connect_host(self.opts.host)}:{self.opts.metrics_port}/metrics"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def drain(self, grace_s: float) -> bool:
        """Ask decode to stop admitting and to finish (or cut) its streams within `grace_s`."""
        return drain_decode(self.grpc_url, grace_s)

    def stop(self, timeout: float | None = None) -> int:
        """Drain decode, then SIGTERM: in-flight streams end cleanly before Triton's exit timeout."""
        if self.alive():
            started = time.monotonic()
            drained = self.drain(max(1.0, self.opts.exit_timeout_s - 10))
            # the streams' last chunks may still be queued for stream_guard: Triton stops scheduling
            # ensemble steps once it is told to exit, which would leave those requests hanging
            quiet = wait_for_no_pending(self.metrics_url, timeout=max(2.0, self.opts.exit_timeout_s - (time.monotonic() - started)))
            print(f"dsv4-serve: decode {'drained' if drained else 'did not confirm its drain'}"
                  f"{'' if quiet else ' (work still queued)'} in {time.monotonic() - started:.1f}s; stopping tritonserver",
                  file=sys.stderr, flush=True)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc.send_signal(signal.SIGTERM)
            self.ended_held_by_streams = wait_for_exit(self.proc, self.log_path, log_offset,
                                                       timeout or self.opts.exit_timeout_s + 15)
        return self.proc.returncode


def wait_for_no_pending(metrics_url: str, timeout: float) -> bool:
    """Wait until no model has queued requests in two consecutive metric refreshes."""
    end, clear = time.monotonic() + timeout, 0
    while time.monotonic() < end:
        try:
            pending = server_metrics.total(server_metrics.scrape(metrics_url, timeout_s=2), "nv_inference_pending_request_count")
        except (urllib.error.URLError, OSError):
            return False
        clear = clear + 1 if pending == 0 else 0
        if clear >= 2:
            return True
        time.sleep(0.3)
    return False


def drain_decode(grpc_url: str, grace_s: float) -> bool:
    """Send decode's `drain` control over a gRPC stream and wait for its final answer."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    done: queue.Queue = queue.Queue()
    try:
        client = grpcclient.InferenceServerClient(grpc_url)
        control = grpcclient.InferInput("control", [1], "BYTES")
        control.set_data_from_numpy(np.array([f"drain:{grace_s:.1f}".encode()], dtype=np.object_))
        client.start_stream(callback=lambda result, error: done.put(error))
        client.async_stream_infer("decode", [control], enable_empty_final_response=True)
        error = done.get(timeout=grace_s + 10)
        client.stop_stream()
        client.close()
        return error is None
    except Exception:  # the server may already be gone; SIGTERM follows either way
        return False


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def start_server(repo: Path, backends: Path, bundle: TritonBundle, opts: ServerOptions, log_path: Path) -> RunningServer:
    for name, port in (("HTTP", opts.http_port), ("gRPC", opts.grpc_port), ("metrics", opts.metrics_port)):
        if not port_free(opts.host, port):
            raise LaunchError(f"{name} port {port} on {opts.host} is already in use; choose another with --{name.lower()}-port")
    stack = current_plan()
    log = open(log_path, "ab")
    with stack_limit_for_children(stack):
        proc = subprocess.Popen(server_command(bundle, repo, backends, opts), stdout=log, stderr=subprocess.STDOUT,
                                env=server_env(bundle), start_new_session=True)
    log.close()
    return RunningServer(proc, opts, log_path, stack)


def canary(http_url: str, timeout: float = 30.0) -> dict:
    """One real one-token generation through the ensemble; raises on any failure."""
    body = json.dumps({"text_input": "ping", "max_tokens": 1, "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{http_url}/v2/models/dsv4/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    if out.get("num_output_tokens") != 1:
        raise RuntimeError(f"canary answered {out}")
    return out


def wait_ready(server: RunningServer, timeout: float, interrupted: dict | None = None) -> float:
    """Block until a canary inference succeeds; returns seconds waited. Raises LaunchError."""
    start = time.monotonic()
    last_error = "no answer yet"
    while time.monotonic() - start < timeout and not (interrupted and interrupted.get("sig")):
        if not server.alive():
            raise LaunchError(f"tritonserver exited with code {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    canary(server.http_url)
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
            last_error = str(exc)
        time.sleep(0.25)
    if interrupted and interrupted.get("sig"):
        return time.monotonic() - start
    server.stop(5)
    raise LaunchError(f"server not ready after {timeout:.0f}s ({last_error}):\n{server.log_tail()}")
