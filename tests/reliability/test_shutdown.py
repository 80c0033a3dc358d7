"""SIGTERM to dsv4-serve during 8 active streams (one through its OpenAI API): each stream finishes or
ends with a clear error inside the exit timeout, the server exits cleanly, and no process is left behind."""

from __future__ import annotations

import subprocess
import sys
import threading
import socket
import time

import openai

from dsv4.scripts.triton_launcher import free_ports

from ..server.calls import grpc_stream

EXIT_TIMEOUT = 20


def _processes_under(path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", str(path)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_sigterm_during_streams_drains_and_exits_cleanly(tiny_dir, tmp_path):
    http, grpc, metrics, openai_port = free_ports(4)
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "dsv4.scripts.serve", "--model", str(tiny_dir), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--exit-timeout", str(EXIT_TIMEOUT),
           "--max-model-len", "4096", "--workdir", str(work), "--openai-port", str(openai_port)]
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    for line in serve.stdout:
        banner.append(line)
        if "is ready" in line:
            break
    assert serve.poll() is None, "".join(banner)

    url = f"127.0.0.1:{grpc}"
    replies: dict[int, object] = {}
    # six streams far longer than the drain allows (one of them through the OpenAI API), two that finish inside it
    lengths = [3000] * 5 + [20, 40]
    threads = [threading.Thread(target=lambda i=i, n=n: replies.__setitem__(i, grpc_stream(url, f"stream {i}", max_tokens=n, timeout=120)))
               for i, n in enumerate(lengths)]
    openai_end: dict[str, object] = {}

    def openai_stream() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused", max_retries=0, timeout=120)
        chunks = 0
        try:
            for _ in client.completions.create(model="dsv4", prompt="openai stream", max_tokens=3000, stream=True):
                chunks += 1
            openai_end["error"] = None
        except openai.APIError as exc:
            openai_end["error"] = exc.message
        openai_end["chunks"] = chunks

    threads.append(threading.Thread(target=openai_stream))
    for t in threads:
        t.start()
    time.sleep(3)
    stopped_at = time.monotonic()
    serve.terminate()
    for t in threads:
        t.join(EXIT_TIMEOUT + 30)
    code = serve.wait(EXIT_TIMEOUT + 30)
    took = time.monotonic() - stopped_at
    output = "".join(banner) + serve.stdout.read()

    assert code == 0, output
    assert took < EXIT_TIMEOUT + 15, (took, output)
    assert len(replies) == 7
    # the OpenAI stream was cut at the drain deadline like the gRPC ones, with an OpenAI error event
    assert openai_end["chunks"] > 0 and "shutting down" in openai_end["error"], openai_end
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", openai_port)) != 0, "dsv4-openai still listening"
    for i, reply in replies.items():
        if reply.error is None:  # finished, or cut at the drain deadline with its reason
            assert reply.finish_reason in ("length", "stop", "shutdown"), (i, reply.finish_reason)
        else:  # reached decode only after the drain began
            assert "shutting down" in reply.error and not reply.ids, (i, reply.error)
    assert any(r.finish_reason == "shutdown" and 0 < len(r.ids) < 3000 for r in replies.values()), replies
    assert all(replies[i].finish_reason in ("length", "") for i in (5, 6)), replies
    time.sleep(2)
    assert _processes_under(work) == []
