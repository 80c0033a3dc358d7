"""The load test's OpenAI path: a scenario request becomes the body AIPerf would send, and each
server-sent event of dsv4-openai becomes a chunk timed and counted like the gRPC ones."""

from __future__ import annotations

import json

import pytest

from dsv4.client import GenerationRequest
from dsv4.client.http_client import SSEEvent
from dsv4.client.types import ChatMessage, ServerError
from load_tests.openai_events import chunk_from_openai, request_body


def _event(obj) -> SSEEvent:
    return SSEEvent(obj if isinstance(obj, str) else json.dumps(obj), "message", None)


def test_chat_and_text_requests_become_streamed_completion_bodies():
    chat = GenerationRequest(messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")), max_tokens=64,
                             temperature=0.0, seed=7, stop=("\n\n",))
    path, body = request_body(chat, "dsv4")
    assert path == "/v1/chat/completions" and body["messages"][1] == {"role": "user", "content": "hi"}
    assert body["max_completion_tokens"] == 64 and body["temperature"] == 0.0 and body["seed"] == 7
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["return_token_ids"]
    assert body["stop"] == ["\n\n"] and "top_p" not in body and "max_tokens" not in body
    assert "min_tokens" not in body
    path, body = request_body(GenerationRequest(prompt="Once", max_tokens=5, min_tokens=5, top_k=3), "m")
    assert path == "/v1/completions" and body["prompt"] == "Once" and body["max_tokens"] == 5 and body["top_k"] == 3
    assert body["min_tokens"] == 5


def test_events_become_chunks_with_the_servers_tokens_and_counts():
    role = chunk_from_openai(_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 1.0)
    assert role.text == "" and role.token_ids == () and not role.has_tokens
    token = chunk_from_openai(_event({"choices": [{"delta": {"content": "Hel"}, "token_ids": [5, 6],
                                                   "finish_reason": None}]}), 2.0)
    assert (token.text, token.token_ids, token.arrival_s, token.finish_reason) == ("Hel", (5, 6), 2.0, "")
    text = chunk_from_openai(_event({"choices": [{"text": "lo", "token_ids": [7], "finish_reason": "length"}]}), 3.0)
    assert (text.text, text.token_ids, text.finish_reason) == ("lo", (7,), "length")
    usage = chunk_from_openai(_event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}), 4.0)
    assert (usage.num_input_tokens, usage.num_output_tokens, usage.token_ids) == (9, 3, ())
    assert chunk_from_openai(_event("[DONE]"), 5.0) is None
    with pytest.raises(ServerError, match="max_tokens must be"):
        chunk_from_openai(_event({"error": {"message": "max_tokens must be >= 1", "type": "invalid_request_error"}}), 6.0)
    with pytest.raises(ServerError, match="malformed"):
        chunk_from_openai(_event("{not json"), 7.0)
