"""dsv4-openai's DeepSeek-V4 prompt rendering: the same text as the server's own chat template for
plain conversations, tools and tool results in the V4 layout, thinking mode, clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.backend.tokenizer import apply_chat_template
from dsv4.client.openai_server.chat_template import TemplateError, render_prompt
from dsv4.client.openai_server.dsml import BLOCK_END, BLOCK_START, ToolCallParser

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text})
conversation = st.tuples(st.lists(st.fixed_dictionaries({"role": st.just("system"), "content": text}), max_size=2),
                         st.lists(turn, min_size=1, max_size=6)).map(lambda parts: parts[0] + parts[1])

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}


@settings(max_examples=200, deadline=None)
@given(conversation)
def test_plain_conversations_render_as_the_servers_chat_template(messages):
    assert render_prompt(messages) == apply_chat_template(messages)


def test_text_parts_join_as_in_the_server_template():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_prompt(messages) == apply_chat_template(messages)


def test_tools_go_into_the_system_prompt_and_past_calls_round_trip_through_the_parser():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "cold"}, {"role": "user", "content": "And?"}]
    prompt = render_prompt(messages, tools=TOOLS)
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools")
    assert json.dumps(TOOLS[0]["function"]) in prompt
    # the tool result and the user text after it form one user turn
    assert prompt.endswith("<｜User｜><tool_result>cold</tool_result>\n\nAnd?<｜Assistant｜></think>")
    block = prompt[prompt.index("Checking.") + len("Checking."):prompt.rindex(BLOCK_END) + len(BLOCK_END)]
    assert block.startswith("\n\n" + BLOCK_START)
    parser = ToolCallParser()
    content, _ = parser.feed(block)
    parser.finish()
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", {"city": "Oslo", "days": 2})]


def test_thinking_mode_opens_reasoning_and_keeps_it_only_after_the_last_user_turn():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
                {"role": "user", "content": "c"}]
    assert render_prompt(messages, thinking=True) == ("<｜begin▁of▁sentence｜><｜User｜>a<｜Assistant｜></think>b"
                                                      "<｜end▁of▁sentence｜><｜User｜>c<｜Assistant｜><think>")
    # with tools in play the reasoning of earlier turns stays
    with_tools = render_prompt(messages, tools=TOOLS, thinking=True)
    assert "<｜Assistant｜><think>r1</think>b<｜end▁of▁sentence｜>" in with_tools


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "messages[1].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
    ([], "messages"),
], ids=["late_system", "no_content", "arguments_not_object", "image_part", "empty"])
def test_malformed_conversations_name_the_field(messages, param):
    with pytest.raises(TemplateError) as err:
        render_prompt(messages)
    assert err.value.param == param
