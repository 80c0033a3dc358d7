"""dsv4-openai against the real tritonserver, driven by the official `openai` client.

Expected tokens come from dsv4-generate (in-process greedy generation, no server), so the whole
path (OpenAI request -> chat template -> gRPC stream -> Triton ensemble -> SSE) is checked
against the model itself. Token ids are read through vLLM's `return_token_ids` extension.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from dsv4.backend.tokenizer import TextCodec
from dsv4.client.openai_server.chat_template import render_prompt
from dsv4.scripts import generate
from dsv4.scripts.triton_launcher import free_ports

from .calls import metric, wait_idle

KEY = "sk-test-" + secrets.token_hex(8)
PROMPT = "The capital of France is"
N = 8


@pytest.fixture(scope="module")
def openai_url(server):
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4.client.openai_server", "--triton", server.grpc_url,
                             "--port", str(port), "--api-key", KEY, "--default-max-tokens", str(N)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except (urllib.error.URLError, OSError):
            assert time.monotonic() < deadline, "dsv4-openai did not come up"
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def client(openai_url):
    return openai.OpenAI(base_url=f"{openai_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def codec(tiny_dir):
    return TextCodec.load(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """dsv4-generate --json for the given arguments (greedy), run in this process, cached."""
    cache: dict[tuple[str, ...], dict] = {}

    def run(*args: str, max_tokens: int = N) -> dict:
        argv = ("--model", str(tiny_dir), "--max-tokens", str(max_tokens), "--json", *args)
        if argv not in cache:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert generate.main(list(argv)) == 0
            cache[argv] = json.loads(out.getvalue())
        return cache[argv]

    return run


def ids_of(codec, messages, **template) -> str:
    return ",".join(map(str, codec.encode(render_prompt(messages, **template), add_bos=False)))


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["dsv4"]
    assert client.models.retrieve("dsv4").id == "dsv4"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_matches_dsv4_generate(client, reference, codec, stream):
    ref = reference("--prompt", PROMPT)
    kwargs = dict(model="dsv4", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"return_token_ids": True})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        ids = [i for c in chunks if c.choices for i in c.choices[0].model_extra["token_ids"]]
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
        assert not chunks[-1].choices and all(c.usage is None for c in chunks[:-1])
    else:
        resp = client.completions.create(**kwargs)
        text, ids, reason, usage = (resp.choices[0].text, resp.choices[0].model_extra["token_ids"],
                                    resp.choices[0].finish_reason, resp.usage)
    assert ids == ref["token_ids"] and text == ref["text"]
    assert reason == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(codec.encode(PROMPT)), N)
    assert usage.total_tokens == usage.prompt_tokens + N


CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Hello there"}],
    "with_history": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_matches_dsv4_generate(client, reference, codec, name, stream):
    messages = CONVERSATIONS[name]
    ref = reference("--chat", "--prompt", messages[0]["content"]) if name == "one_turn" else \
        reference("--input-ids", ids_of(codec, messages))
    kwargs = dict(model="dsv4", messages=messages, max_completion_tokens=N, temperature=0,
                  extra_body={"return_token_ids": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        ids = [i for c in chunks if c.choices for i in (c.choices[0].model_extra.get("token_ids") or [])]
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        resp = client.chat.completions.create(**kwargs)
        choice = resp.choices[0]
        assert choice.message.role == "assistant" and resp.id.startswith("chatcmpl-")
        text, ids, reason, usage = choice.message.content, choice.model_extra["token_ids"], choice.finish_reason, resp.usage
    assert ids == ref["token_ids"] and text == ref["text"]
    assert reason == "length"
    assert usage.prompt_tokens == len(codec.encode(render_prompt(messages), add_bos=False)) == ref["num_input_tokens"]
    assert usage.completion_tokens == N


def test_stop_string_ends_the_answer_with_finish_reason_stop(client, reference):
    ref = reference("--chat", "--prompt", "Hello there", max_tokens=16)["text"]
    stop = ref[len(ref) // 2:][:3]
    assert stop
    resp = client.chat.completions.create(model="dsv4", messages=CONVERSATIONS["one_turn"], max_tokens=16,
                                          temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == ref[: ref.find(stop)]


def test_thinking_mode_answers_in_reasoning_content(client, reference, codec):
    messages = CONVERSATIONS["one_turn"]
    ref = reference("--input-ids", ids_of(codec, messages, thinking=True))
    assert "</think>" not in ref["text"]  # random weights: the reasoning never ends within N tokens
    resp = client.chat.completions.create(model="dsv4", messages=messages, max_tokens=N, temperature=0,
                                          extra_body={"chat_template_kwargs": {"thinking": True}})
    message = resp.choices[0].message
    assert message.model_extra["reasoning_content"] == ref["text"] and message.content == ""


def test_tools_and_tool_history_reach_the_model_as_rendered(client, reference, codec):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    ref = reference("--input-ids", ids_of(codec, messages, tools=tools))
    resp = client.chat.completions.create(model="dsv4", messages=messages, tools=tools, max_tokens=N, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert resp.choices[0].model_extra["token_ids"] == ref["token_ids"]
    assert resp.usage.prompt_tokens == ref["num_input_tokens"]
    assert not resp.choices[0].message.tool_calls  # random weights write no DSML; the parser is unit-tested


def _post_and_hang_up(url: str, body: dict, after_s: float) -> None:
    """A client that sends a request and goes away without reading the answer."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(data)).encode()
                     + b"\r\n\r\n" + data)
        time.sleep(after_s)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_client_disconnect_cancels_decode_and_frees_its_blocks(server, client, openai_url, stream):
    wait_idle(server)
    before = metric(server.metrics_url, "vllm:generation_tokens_total")
    body = {"model": "dsv4", "prompt": "Tell me a long story", "max_tokens": 1000, "temperature": 0}
    if stream:
        received = 0
        with client.completions.create(stream=True, **body) as chunks:
            for _ in chunks:
                received += 1
                if received == 5:
                    break  # leaving the block closes the connection mid-stream
    else:
        _post_and_hang_up(openai_url, body, after_s=1.0)
    wait_idle(server)
    generated = metric(server.metrics_url, "vllm:generation_tokens_total") - before
    assert 0 < generated < 200, generated  # decode stopped long before max_tokens
    assert metric(server.metrics_url, "dsv4_kv_blocks_used") == 0


@pytest.mark.parametrize("field, value, param", [
    ("temperature", "hot", "temperature"),
    ("n", 2, "n"),
    ("max_tokens", 100_000, "max_tokens"),           # Triton's own limit, mapped back to the field
    ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("stop", [""], "stop"),
    ("logprobs", True, "logprobs"),
], ids=["type", "n", "server_limit", "role", "empty_stop", "unsupported"])
def test_bad_fields_give_openai_shaped_400s(client, field, value, param):
    body = {"model": "dsv4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, field: value}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{k: v for k, v in body.items() if k in ("model", "messages")},
                                       extra_body={k: v for k, v in body.items() if k not in ("model", "messages")})
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.type == "invalid_request_error" and param.split("[")[0] in err.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_wrong_or_missing_key_is_401(openai_url):
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{openai_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert err.value.code == "invalid_api_key"
    request = urllib.request.Request(f"{openai_url}/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=10)
    assert missing.value.code == 401
    assert set(json.loads(missing.value.read())["error"]) == {"message", "type", "param", "code"}


def test_locust_through_the_openai_api_counts_what_the_server_generated(server, openai_url, tmp_path, monkeypatch):
    """The load test's OpenAI user (the path AIPerf takes) against dsv4-openai: every request ok, its
    token ids add up to the usage the server reports, and no more tokens are counted than decode made
    (requests still running when the run's time is up are stopped and not recorded)."""
    from load_tests import run as load_run
    from load_tests.report import read_samples

    monkeypatch.setenv("DSV4_OPENAI_API_KEY", KEY)
    wait_idle(server)
    before = metric(server.metrics_url, "vllm:generation_tokens_total")
    code = load_run.main(["--scenario", "short_chat", "--host", f"openai://{openai_url.split('://', 1)[1]}",
                          "--users", "2", "--duration", "8s", "--out", str(tmp_path), "--no-plots"])
    assert code == 0
    samples = read_samples([tmp_path / "raw-u2.jsonl"])
    assert samples and all(s["status"] == "ok" and s["protocol"] == "openai" for s in samples), samples[:2]
    assert all(s["t_first"] is not None and s["t_first"] > s["t0"] and 1 <= s["num_output_tokens"] <= 64 for s in samples)
    assert all(sum(s["chunk_tokens"]) == s["num_output_tokens"] for s in samples)
    wait_idle(server)
    time.sleep(0.3)  # counters are published every 0.1 s
    made = metric(server.metrics_url, "vllm:generation_tokens_total") - before
    assert 0 < sum(s["num_output_tokens"] for s in samples) <= made
