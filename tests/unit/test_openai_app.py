"""dsv4-openai's HTTP surface without a model: keys, request validation, model names, and what
an unreachable Triton or Triton's own errors become. The application is driven through ASGI."""

from __future__ import annotations

import asyncio
import json

import pytest

from dsv4.client import ConnectionFailed, InvalidArgument, ServerError, Unavailable
from dsv4.client.openai_server import OpenAIServerConfig, create_app
from dsv4.client.openai_server.errors import from_client_error
from dsv4.scripts.triton_launcher import free_ports

KEY = "sk-unit"
CHAT = {"model": "dsv4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# one event loop for the module: the app's gRPC client lives on the loop it was first used on
LOOP = asyncio.new_event_loop()


def call(app, method: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict, dict]:
    """One request through the ASGI app: (status, headers, JSON body)."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 9000)}
    incoming = [{"type": "http.request", "body": json.dumps(body).encode() if body is not None else b"",
                 "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # this client never goes away
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    LOOP.run_until_complete(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(payload)


@pytest.fixture(scope="module", autouse=True)
def _close_loop():
    yield
    LOOP.close()


@pytest.fixture(scope="module")
def app():
    # nothing listens on this port: every generation meets an unreachable Triton
    return create_app(OpenAIServerConfig(triton_url=f"127.0.0.1:{free_ports(1)[0]}", api_keys=frozenset({KEY})))


def error_of(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("key", [None, "sk-wrong"], ids=["missing", "wrong"])
def test_requests_without_the_key_get_401(app, key):
    status, headers, body = call(app, "POST", "/v1/chat/completions", CHAT, key=key)
    assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer"
    assert call(app, "GET", "/v1/models", key=key)[0] == 401


def test_models_and_unknown_routes(app):
    status, _, body = call(app, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["dsv4"]
    assert call(app, "GET", "/v1/models/other")[0] == 404
    status, _, body = call(app, "GET", "/v2/anything")
    assert status == 404 and error_of(body)["code"] == "not_found"


@pytest.mark.parametrize("path, change, param", [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"seed": -1}, "seed"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages[1].role"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None)
def test_bad_fields_are_400_naming_the_field(app, path, change, param):
    body = {**CHAT, **change} if "chat" in path else {"model": "dsv4", "prompt": "x", **change}
    status, _, payload = call(app, "POST", path, body)
    error = error_of(payload)
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", payload


def test_body_that_is_not_json_is_400(app):
    status, _, payload = call(app, "POST", "/v1/completions", None)
    assert status == 400 and "JSON" in error_of(payload)["message"]


def test_unknown_model_is_404(app):
    status, _, payload = call(app, "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"})
    assert status == 404 and error_of(payload)["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_triton_is_503(app, stream):
    status, headers, payload = call(app, "POST", "/v1/chat/completions", {**CHAT, "stream": stream})
    assert status == 503 and error_of(payload)["code"] == "service_unavailable" and "retry-after" in headers
    assert call(app, "GET", "/health", key=None)[0] == 503


@pytest.mark.parametrize("error, status, param", [
    (InvalidArgument("in ensemble 'dsv4', max_tokens: must be <= 1024, got 5000"), 400, "max_tokens"),
    (InvalidArgument("text_input: prompt has 9000 tokens, more than the limit of 2048"), 400, "messages"),
    (ServerError("in ensemble 'dsv4', stop_words: must not contain empty strings"), 400, "stop"),
    (Unavailable("server is full: the decode queue is at its limit; try again later"), 429, None),
    (Unavailable("the request needs more KV cache than the decode pool holds"), 400, "max_tokens"),
    (Unavailable("server is shutting down; try again later"), 503, None),
    (ConnectionFailed("failed to connect to all addresses"), 503, None),
    (ServerError("Stub process is not healthy"), 500, None),
], ids=["limit", "prompt_too_long", "stream_error_text", "queue_full", "too_big", "stopping", "unreachable",
        "internal"])
def test_triton_errors_map_to_openai_statuses(error, status, param):
    mapped = from_client_error(error, {"text_input": "messages"})
    assert (mapped.status, mapped.param) == (status, param)
    assert not mapped.message.startswith("in ensemble")
