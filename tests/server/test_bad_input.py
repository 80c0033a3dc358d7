"""Bad input comes back as INVALID_ARG (HTTP 400) naming the field; the server keeps serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .calls import grpc_inputs, grpc_stream, grpc_unary, http_post
from .conftest import MAX_MODEL_LEN

HTTP_CASES = [
    ({"text_input": ""}, "text_input", "must not be empty"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"text_input": "hi", "max_tokens": 5000}, "max_tokens", "<= 1024"),
    ({"text_input": "hi", "temperature": -0.5}, "temperature", ">= 0"),
    ({"text_input": "hi", "top_p": 0.0}, "top_p", "> 0"),
    ({"text_input": "hi", "top_p": 1.5}, "top_p", "<= 1"),
    ({"text_input": "hi", "top_k": -1}, "top_k", ">= 0"),
    ({"text_input": "word " * (MAX_MODEL_LEN + 10)}, "text_input", "more than the limit"),
    ({"text_input": "word " * 1500, "max_tokens": 1000}, "max_tokens", "exceeds the model's context"),
    ({"max_tokens": 4}, "text_input", "is required"),
    ({"text_input": "hi", "stop_words": [""]}, "stop_words", "empty"),
    ({"text_input": "[1, 2]", "apply_chat_template": True}, "messages[0]", ""),
]


@pytest.mark.parametrize("body, field, words", HTTP_CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(HTTP_CASES)])
def test_http_generate_rejects_with_400_naming_the_field(server, body, field, words):
    status, raw = http_post(server.http_url, "/v2/models/dsv4/generate", body)
    reply = json.loads(raw)
    assert status == 400, reply
    assert field in reply["error"] and words in reply["error"]


GRPC_CASES = [
    (b"\xff\xfe broken", {}, "text_input", "not valid UTF-8"),
    (b"hi", {"temperature": float("nan")}, "temperature", "finite"),
    (b"hi", {"max_tokens": -3}, "max_tokens", ">= 1"),
    (b"hi", {"max_tokens": np.array([2.0], dtype=np.float32)}, "max_tokens", "FP32"),
]


@pytest.mark.parametrize("prompt, params, field, words", GRPC_CASES, ids=["utf8", "nan", "negative", "dtype"])
def test_grpc_stream_and_unary_reject_naming_the_field(server, prompt, params, field, words):
    reply = grpc_stream(server.grpc_url, prompt, **params)
    assert reply.error is not None and field in reply.error and words in reply.error
    unary = grpc_unary(server.grpc_url, prompt, **params)
    assert unary.error is not None and "INVALID_ARG" in unary.error and field in unary.error


def test_unary_grpc_on_the_streaming_ensemble_is_refused_clearly(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="decoupled"):
        client.infer("dsv4", grpc_inputs("hi"))


def test_server_keeps_serving_after_bad_input(server):
    reply = grpc_stream(server.grpc_url, "still alive?", max_tokens=5, temperature=0.0)
    assert reply.error is None and len(reply.ids) == 5
