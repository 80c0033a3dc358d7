"""Bodies of 5, 18 and 100 MB over HTTP (as `curl -d` sends them and as JSON) and gRPC get a
clear error naming the field, and the server keeps serving. Before dsv4-serve raised
tritonserver's stack limit, a 5 MB form-encoded body killed it with SIGSEGV."""

from __future__ import annotations

import json

import pytest

from dsv4.scripts.health import probe

from ..server.calls import grpc_stream, grpc_unary, http_post

SIZES_MB = (5, 18, 100)


def _body(mb: int) -> bytes:
    return json.dumps({"text_input": "token " * (mb * 1_000_000 // 6), "max_tokens": 2}).encode()


@pytest.mark.parametrize("mb", SIZES_MB)
def test_large_http_bodies_are_refused_and_the_server_keeps_serving(server, mb):
    body = _body(mb)
    for content_type in ("application/x-www-form-urlencoded", "application/json"):
        code, raw = http_post(server.http_url, "/v2/models/dsv4/generate", body, content_type=content_type)
        message = json.loads(raw)["error"]
        assert code == 400 and "text_input" in message and "characters" in message, (content_type, code, message[:300])
    assert server.alive()
    assert probe(server.http_url, timeout=30)[0]


@pytest.mark.parametrize("mb", SIZES_MB)
def test_large_grpc_messages_are_refused_and_the_server_keeps_serving(server, mb):
    prompt = "token " * (mb * 1_000_000 // 6)
    for reply in (grpc_stream(server.grpc_url, prompt, max_tokens=2), grpc_unary(server.grpc_url, prompt, max_tokens=2)):
        assert reply.error is not None and "text_input" in reply.error and "characters" in reply.error, reply.error[:300]
    assert server.alive()
    assert grpc_stream(server.grpc_url, "still serving", max_tokens=3).error is None
