"""dsv4.client against the real tritonserver: sync and async transports, unary calls, cancellation,
error mapping and the dsv4-client command line. Expected tokens come from plain tritonclient calls
(tests/server/calls.py), so the client library is checked against the server, not against itself."""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request

import pytest

from dsv4.backend.tokenizer import TextCodec
from dsv4.client import (
    ConnectionFailed,
    GenerationRequest,
    GrpcClient,
    HttpClient,
    InvalidArgument,
)
from dsv4.client import cli
from dsv4.client.aio import AsyncGrpcClient, AsyncHttpClient
from dsv4.scripts.triton_launcher import free_ports

from .calls import grpc_stream, metric

PROMPT = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def codec(tiny_dir):
    return TextCodec.load(tiny_dir)


@pytest.fixture(scope="module")
def expected(server):
    """Greedy tokens per prompt, from tritonclient's own streaming API."""
    cache = {}

    def get(prompt: str, max_tokens: int = N, **params):
        key = (prompt, max_tokens, json.dumps(params, sort_keys=True))
        if key not in cache:
            reply = grpc_stream(server.grpc_url, prompt, max_tokens=max_tokens, temperature=0.0, **params)
            assert reply.error is None, reply.error
            cache[key] = reply
        return cache[key]

    return get


def greedy(prompt: str = PROMPT, max_tokens: int = N, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)


def sync_client(server, protocol: str):
    return GrpcClient(server.grpc_url) if protocol == "grpc" else HttpClient(server.http_url)


def model_counter(metrics_url: str, name: str, model: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    prefix = f'{name}{{model="{model}",'
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    assert values, f"{name} for {model} not exported"
    return sum(values)


def wait_idle(metrics_url: str, timeout: float = 10.0) -> float:
    """Seconds until decode holds no request (fails after ``timeout``)."""
    start = time.monotonic()
    while metric(metrics_url, "vllm:num_requests_running") != 0:
        assert time.monotonic() - start < timeout, "decode still holds requests"
        time.sleep(0.05)
    return time.monotonic() - start


def wait_running(metrics_url: str, timeout: float = 5.0) -> None:
    start = time.monotonic()
    while metric(metrics_url, "vllm:num_requests_running") < 1:
        assert time.monotonic() - start < timeout, "the request never reached decode"
        time.sleep(0.05)


# --- sync transports ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sync_stream_and_generate_equal_tritonclient(server, expected, codec, protocol):
    ref = expected(PROMPT)
    assert len(ref.ids) == N
    with sync_client(server, protocol) as client:
        chunks = list(client.stream(greedy()))
        assert [t for c in chunks for t in c.token_ids] == ref.ids
        assert "".join(c.text for c in chunks) == ref.text
        # one response per token as they are produced, not one buffered answer
        assert len(chunks) >= N - 2
        arrivals = [c.arrival_s for c in chunks]
        assert arrivals == sorted(arrivals) and arrivals[-1] - arrivals[0] > 0.005 * (N - 1)
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason == "" for c in chunks[:-1])
        assert [c.num_output_tokens for c in chunks][-1] == N
        for _ in range(2):  # the client reuses its stream / connection
            result = client.generate(greedy())
            assert result.token_ids == tuple(ref.ids) and result.text == ref.text
            assert result.finish_reason == "length" and result.num_output_tokens == N
            assert result.num_input_tokens == len(codec.encode(PROMPT))
            assert 0 < result.ttft_s < result.total_s and len(result.token_times_s) == N
            assert result.itl_s == pytest.approx((result.total_s - result.ttft_s) / (N - 1))


@pytest.mark.parametrize("prompt", ["Hello", "你好，世界！🎉 emoji and ñ", "a " * 300], ids=["short", "cjk-emoji", "long"])
def test_greedy_generate_equals_grpc_stream(server, expected, prompt):
    ref = expected(prompt, 16)
    with GrpcClient(server.grpc_url) as client:
        result = client.generate(greedy(prompt, 16))
    assert list(result.token_ids) == ref.ids and result.text == ref.text


def test_grpc_infer_is_unary_on_dsv4_unary(server, expected):
    ref = expected(PROMPT)
    before = model_counter(server.metrics_url, "nv_inference_request_success", "dsv4_unary")
    with GrpcClient(server.grpc_url) as client:
        result = client.infer(greedy())
    assert list(result.token_ids) == ref.ids and result.text == ref.text
    assert result.finish_reason == "length" and result.num_output_tokens == N
    assert result.ttft_s == result.total_s > 0  # one response carries everything
    assert model_counter(server.metrics_url, "nv_inference_request_success", "dsv4_unary") == before + 1


def test_http_infer_is_one_generate_answer(server, expected):
    ref = expected(PROMPT)
    with HttpClient(server.http_url) as client:
        result = client.infer(greedy())
    assert list(result.token_ids) == ref.ids and result.text == ref.text
    assert result.finish_reason == "length" and result.num_output_tokens == N


# --- asyncio --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_clients_run_requests_concurrently(server, expected, protocol):
    prompts = ["one fish", "two fish", "red fish blue fish"]
    refs = [expected(p, 24) for p in prompts]

    async def run():
        client = (AsyncGrpcClient(server.grpc_url) if protocol == "grpc" else AsyncHttpClient(server.http_url))
        async with client:
            started = time.perf_counter()
            results = await asyncio.gather(*[client.generate(greedy(p, 24)) for p in prompts])
            elapsed = time.perf_counter() - started
            chunks = [c async for c in client.stream(greedy())]
            unary = await client.infer(greedy())
        return results, elapsed, chunks, unary

    results, elapsed, chunks, unary = asyncio.run(run())
    for result, ref in zip(results, refs, strict=True):
        assert list(result.token_ids) == ref.ids and result.finish_reason == "length"
    # sent together: each request spans most of the batch; one after another they would sum to ~elapsed
    assert sum(r.total_s for r in results) > 1.5 * elapsed
    assert [t for c in chunks for t in c.token_ids] == expected(PROMPT).ids
    assert list(unary.token_ids) == expected(PROMPT).ids


# --- cancellation ---------------------------------------------------------------------------


def test_cancelled_grpc_stream_frees_the_server(server):
    wait_idle(server.metrics_url)
    generated = metric(server.metrics_url, "vllm:generation_tokens_total")
    with GrpcClient(server.grpc_url) as client:
        stream = client.stream(greedy("tell me everything", 1000))
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 5:
                break
        wait_running(server.metrics_url)
        stream.cancel()
        result = stream.result()
        assert result.finish_reason == "cancelled" and 5 <= result.num_output_tokens < 50
        # 1000 tokens take ~20 s here; the server lets go of the request at once
        assert wait_idle(server.metrics_url, timeout=5.0) < 5.0
        time.sleep(0.3)  # counters are published every 0.1 s
        assert metric(server.metrics_url, "vllm:generation_tokens_total") - generated < 50
        # the same client opens a new stream for the next request
        assert client.generate(greedy(max_tokens=3)).num_output_tokens == 3
    assert metric(server.metrics_url, "vllm:num_requests_waiting") == 0


def test_cancelling_an_async_grpc_task_cancels_the_request(server):
    wait_idle(server.metrics_url)

    async def run():
        async with AsyncGrpcClient(server.grpc_url) as client:
            got = []

            async def consume():
                async for chunk in client.stream(greedy("tell me everything", 1000)):
                    got.append(chunk)

            task = asyncio.create_task(consume())
            while len(got) < 3:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(wait_running, server.metrics_url)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return len(got)

    assert 3 <= asyncio.run(run()) < 50
    assert wait_idle(server.metrics_url, timeout=5.0) < 5.0


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("field, kwargs", [("max_tokens", {"max_tokens": 0}), ("top_p", {"top_p": 2.0}),
                                           ("temperature", {"temperature": -1.0})])
def test_invalid_argument_names_the_field(server, protocol, field, kwargs):
    request = GenerationRequest(prompt="x", **{"max_tokens": 4, **kwargs})
    with sync_client(server, protocol) as client:
        with pytest.raises(InvalidArgument, match=field) as stream_error:
            list(client.stream(request))
        with pytest.raises(InvalidArgument, match=field):
            client.infer(request)
        assert client.generate(greedy(max_tokens=2)).num_output_tokens == 2  # still usable
    if protocol == "http":
        assert stream_error.value.http_status == 400


def test_connection_refused_on_a_closed_port():
    (port,) = free_ports(1)  # free now: nothing listens there
    with GrpcClient(f"127.0.0.1:{port}") as client, pytest.raises(ConnectionFailed):
        client.generate(greedy())
    with HttpClient(f"http://127.0.0.1:{port}", timeout_s=5) as client, pytest.raises(ConnectionFailed):
        client.generate(greedy())
    err = io.StringIO()
    code = cli.main(["--url", f"127.0.0.1:{port}", "--prompt", "x", "--retries", "1"], stdout=io.StringIO(), stderr=err)
    assert code == cli.EXIT_CONNECTION and "dsv4-client:" in err.getvalue()


# --- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grpc", "grpc-unary", "http"])
def test_cli_json(server, expected, codec, mode):
    url = server.http_url if mode == "http" else server.grpc_url
    argv = ["--url", url, "--prompt", PROMPT, "--max-tokens", str(N), "--temperature", "0", "--json"]
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv + (["--unary"] if mode == "grpc-unary" else []), stdout=out, stderr=err)
    assert code == cli.EXIT_OK, err.getvalue()
    answer = json.loads(out.getvalue())
    assert answer["token_ids"] == expected(PROMPT).ids and answer["text"] == expected(PROMPT).text
    assert answer["finish_reason"] == "length" and answer["num_output_tokens"] == N
    assert answer["num_input_tokens"] == len(codec.encode(PROMPT))
    assert 0 < answer["ttft_s"] <= answer["total_s"]


def test_cli_rejected_request_exits_3_with_the_servers_message(server):
    err = io.StringIO()
    code = cli.main(["--url", server.grpc_url, "--prompt", "x", "--max-tokens", "0"], stdout=io.StringIO(), stderr=err)
    assert code == cli.EXIT_REJECTED and "max_tokens" in err.getvalue()


def test_cli_chat_through_stdin_keeps_history_until_reset(server):
    system = "Be brief."
    stdin = io.StringIO("hello\nand then?\n/reset\nhello\n")  # ends with EOF
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["chat", "--url", server.grpc_url, "--system", system, "--max-tokens", "8", "--temperature", "0",
                     "-v"], stdin=stdin, stdout=out, stderr=err)
    assert code == cli.EXIT_OK, err.getvalue()

    def chat(messages):
        reply = grpc_stream(server.grpc_url, json.dumps(messages), max_tokens=8, temperature=0.0,
                            apply_chat_template=True, exclude_input_in_output=True)
        assert reply.error is None
        return reply.text

    first = [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
    a1 = chat(first)
    a2 = chat([*first, {"role": "assistant", "content": a1}, {"role": "user", "content": "and then?"}])
    assert out.getvalue() == f"{a1}\n{a2}\n{a1}\n"
    assert err.getvalue().count("[finish=length") == 3 and "(history cleared)" in err.getvalue()
