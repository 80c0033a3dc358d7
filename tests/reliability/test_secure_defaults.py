"""Safe defaults: loopback bind, no model control, admin APIs behind a key beyond loopback,
configuration checked before anything starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

from dsv4.scripts.triton_launcher import ServerOptions, TritonBundle, free_ports, server_command

from ..server.calls import http_post
from ..server_fixtures import start


def _call(url: str, headers: dict | None = None, post: bool = False) -> int:
    request = urllib.request.Request(url, data=b"{}" if post else None, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_default_command_binds_loopback_without_model_control(tmp_path):
    cmd = " ".join(server_command(TritonBundle.locate(), tmp_path, tmp_path, ServerOptions()))
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 "--model-control-mode=none"):
        assert flag in cmd
    assert "restricted" not in cmd


def test_model_control_is_closed(server):
    for action in ("unload", "load"):
        code, body = http_post(server.http_url, f"/v2/repository/models/dsv4/{action}", b"{}")
        assert code == 503 and b"explicit model load / unload is not allowed" in body, body


def test_beyond_loopback_admin_apis_need_the_key(tiny_dir, tmp_path):
    server = start(tiny_dir, tmp_path / "srv", ["--host", "0.0.0.0", "--api-key", "s3cret"])
    try:
        for path, post in (("/v2/repository/index", True), ("/v2/systemsharedmemory/status", False)):
            assert _call(server.http_url + path, post=post) == 403, path
            assert _call(server.http_url + path, {"dsv4-api-key": "s3cret"}, post=post) == 200, path
            assert _call(server.http_url + path, {"dsv4-api-key": "wrong"}, post=post) == 403, path
        # inference stays open
        code, body = http_post(server.http_url, "/v2/models/dsv4/generate", {"text_input": "hi", "max_tokens": 2})
        assert code == 200, body
    finally:
        server.stop(20)


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4.scripts.serve", *args], capture_output=True, text=True, timeout=120)


def test_bad_configuration_is_refused_before_the_server_starts(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_attention_heads"] = 0
    (broken / "config.json").write_text(json.dumps(config))
    result = _serve("--model", str(broken))
    assert result.returncode == 2 and "num_heads" in result.stderr and "positive" in result.stderr
    (broken / "model.safetensors").rename(broken / "weights.bin")
    config["num_attention_heads"] = 4
    (broken / "config.json").write_text(json.dumps(config))
    result = _serve("--model", str(broken))
    assert result.returncode == 2 and "only safetensors" in result.stderr
    result = _serve("--model", str(tiny_dir), "--device", "cuda")
    assert result.returncode == 2 and "CUDA" in result.stderr


def test_a_taken_port_fails_with_a_clear_message(tiny_dir, server):
    taken = server.opts.http_port
    http, grpc, metrics = free_ports(3)
    result = _serve("--model", str(tiny_dir), "--http-port", str(taken), "--grpc-port", str(grpc), "--metrics-port", str(metrics))
    assert result.returncode == 1 and f"port {taken}" in result.stderr and "already in use" in result.stderr
