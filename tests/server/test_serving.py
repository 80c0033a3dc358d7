"""End to end through the real tritonserver: parity with in-process generation, streaming,
concurrency, stop conditions, unary entry points."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import generate
from dsv4.backend.sampler import SamplingParams
from dsv4.backend.tokenizer import TextCodec

from .calls import grpc_stream, grpc_unary, http_generate, http_stream

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 9, "你好，世界！今天天气怎么样？🎉🚀", "a"]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    model, codec = load_model(tiny_dir, progress=False), TextCodec.load(tiny_dir)

    def run(prompt: str, max_tokens: int) -> list[int]:
        return generate(model, codec.encode(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens)).token_ids

    return run


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "long", "cjk-emoji", "one-char"])
def test_greedy_output_equals_in_process_generation(server, reference, prompt):
    expected = reference(prompt, 24)
    stream = grpc_stream(server.grpc_url, prompt, max_tokens=24, temperature=0.0)
    assert stream.error is None and stream.ids == expected
    status, body = http_generate(server.http_url, prompt, max_tokens=24, temperature=0.0)
    assert status == 200 and body["output_ids"] == expected
    assert http_stream(server.http_url, prompt, max_tokens=24, temperature=0.0).ids == expected


def test_sixteen_concurrent_streams_complete_correctly(server, reference):
    jobs = [(f"request {i}: " + "word " * (i * 7) + "end", 8 + 3 * i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda j: grpc_stream(server.grpc_url, j[0], max_tokens=j[1], temperature=0.0), jobs))
    for (prompt, n), reply in zip(jobs, replies):
        assert reply.error is None
        assert reply.ids == reference(prompt, n)
        assert reply.finish_reason == "length" and reply.num_output_tokens == n


@pytest.mark.parametrize("prompt", ["北京欢迎你，", "emoji 🙂🙃 and ñ, ü, 日本語", "plain ascii words"])
def test_streamed_deltas_concatenate_to_the_non_streamed_text(server, prompt):
    for seed in (1, 2):
        params = dict(max_tokens=40, temperature=1.0, seed=seed)
        streamed = grpc_stream(server.grpc_url, prompt, **params)
        status, whole = http_generate(server.http_url, prompt, exclude_input_in_output=True, **params)
        assert status == 200 and streamed.error is None
        assert streamed.ids == whole["output_ids"]
        assert streamed.text == whole["text_output"]
        assert "\ufffd" not in streamed.text or "\ufffd" in whole["text_output"]


def test_non_streamed_answers_echo_the_prompt_unless_excluded(server):
    status, echoed = http_generate(server.http_url, "Echo me", max_tokens=4, temperature=0.0)
    status2, bare = http_generate(server.http_url, "Echo me", max_tokens=4, temperature=0.0, exclude_input_in_output=True)
    assert status == status2 == 200
    assert echoed["text_output"] == "Echo me" + bare["text_output"]


def test_max_tokens_and_stop_words_are_honoured(server):
    full = grpc_stream(server.grpc_url, "Stop words test", max_tokens=30, temperature=0.0)
    assert full.finish_reason == "length" and len(full.ids) == 30
    text = full.text
    # a stop string from the middle of the known answer: the output ends right before it
    cut = next(i for i in range(len(text) // 2, len(text)) if text[i].strip())
    stop = text[cut : cut + 3]
    first = text.find(stop)
    stopped = grpc_stream(server.grpc_url, "Stop words test", max_tokens=30, temperature=0.0, stop_words=[stop, "never-seen"])
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:first]
    status, body = http_generate(server.http_url, "Stop words test", max_tokens=30, temperature=0.0, stop_words=[stop],
                                 exclude_input_in_output=True)
    assert status == 200 and body["finish_reason"] == "stop" and body["text_output"] == text[:first]


def test_unary_grpc_infer_and_http_infer(server, reference):
    expected = reference("Unary call", 12)
    reply = grpc_unary(server.grpc_url, "Unary call", max_tokens=12, temperature=0.0)
    assert reply.error is None and reply.ids == expected and reply.finish_reason == "length"
    status, body = http_generate(server.http_url, "Unary call", model="dsv4_unary", max_tokens=12, temperature=0.0)
    assert status == 200 and body["output_ids"] == expected
    from .calls import http_post
    import json

    status, raw = http_post(server.http_url, "/v2/models/dsv4_unary/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Unary call"]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [12]},
        {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [0.0]},
    ]})
    outputs = {o["name"]: o["data"] for o in json.loads(raw)["outputs"]}
    assert status == 200 and outputs["output_ids"] == expected


def test_seeded_sampling_is_reproducible_and_seed_sensitive(server):
    a = grpc_stream(server.grpc_url, "Sampling", max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    b = grpc_stream(server.grpc_url, "Sampling", max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    c = grpc_stream(server.grpc_url, "Sampling", max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=8)
    assert a.ids == b.ids and a.ids != c.ids


def test_served_output_equals_the_dsv4_generate_command(server, tiny_dir):
    import json
    import subprocess
    import sys

    prompt = "The command-line tool and the server agree"
    result = subprocess.run([sys.executable, "-m", "dsv4.scripts.generate", "--model", str(tiny_dir), "--prompt", prompt,
                             "--max-tokens", "20", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout)
    stream = grpc_stream(server.grpc_url, prompt, max_tokens=20, temperature=0.0)
    status, body = http_generate(server.http_url, prompt, max_tokens=20, temperature=0.0, exclude_input_in_output=True)
    assert stream.ids == expected["token_ids"] and stream.text == expected["text"]
    assert status == 200 and body["output_ids"] == expected["token_ids"] and body["text_output"] == expected["text"]
