"""A checkpoint written by transformers' save_pretrained, served, equals in-process generation."""

from __future__ import annotations

import pytest

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import generate
from dsv4.backend.sampler import SamplingParams
from dsv4.backend.tokenizer import TextCodec

from ..model.oracle import CONFIG_A, build_hf
from .calls import grpc_stream, http_generate
from .conftest import start


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    # the real vocabulary, so the DeepSeek tokenizer's ids are all valid
    model = build_hf(dict(CONFIG_A, vocab_size=129280), seed=5)
    path = tmp_path_factory.mktemp("hf_served")
    model.save_pretrained(path)
    server = start(path, tmp_path_factory.mktemp("hf_server"))
    yield server, path
    server.stop()


@pytest.mark.parametrize("prompt", ["Hello from transformers", "长一点的中文提示，看看结果是否一致。" * 3])
def test_served_greedy_equals_in_process_on_a_transformers_checkpoint(hf_server, prompt):
    server, path = hf_server
    ids = TextCodec.load(path).encode(prompt)
    expected = generate(load_model(path, progress=False), ids, SamplingParams(temperature=0.0, max_tokens=20)).token_ids
    assert grpc_stream(server.grpc_url, prompt, max_tokens=20, temperature=0.0).ids == expected
    status, body = http_generate(server.http_url, prompt, max_tokens=20, temperature=0.0)
    assert status == 200 and body["output_ids"] == expected
