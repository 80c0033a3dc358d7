"""dsv4-openai beside the tritonserver that dsv4-serve runs: start it once Triton is ready, stop it
first on shutdown (it stops taking requests while decode drains the open streams)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dsv4.scripts.triton_launcher import LaunchError


def openai_command(args, grpc_url: str) -> list[str]:
    """The dsv4-openai command for dsv4-serve's arguments (same bind address, Triton's gRPC port)."""
    cmd = [sys.executable, "-m", "dsv4.client.openai_server", "--triton", grpc_url, "--host", args.host,
           "--port", str(args.openai_port), "--graceful-timeout", str(args.exit_timeout + 15)]
    for name in args.served_model_name or ():
        cmd += ["--served-model-name", name]
    if args.openai_api_key_file is not None:
        cmd += ["--api-key-file", str(Path(args.openai_api_key_file).resolve())]
    return cmd


class OpenAIFrontend:
    """A running dsv4-openai; its output goes to dsv4-serve's stderr."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    @classmethod
    def start(cls, args, grpc_url: str, timeout_s: float = 60.0) -> OpenAIFrontend:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        url = f"http://{f'[{host}]' if ':' in host else host}:{args.openai_port}"
        # its own session: a terminal's Ctrl-C reaches dsv4-serve only, which stops it in order
        proc = subprocess.Popen(openai_command(args, grpc_url), stdout=sys.stderr, stderr=sys.stderr,
                                start_new_session=True)
        frontend = cls(proc, url)
        frontend.wait_ready(timeout_s)
        return frontend

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise LaunchError(f"dsv4-openai exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop(5)
        raise LaunchError(f"dsv4-openai did not answer on {self.url}/health within {timeout_s:.0f}s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def begin_stop(self) -> None:
        """SIGTERM: uvicorn stops accepting and lets open requests finish."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float) -> int:
        self.begin_stop()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
