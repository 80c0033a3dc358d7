"""The chat answer parsers of dsv4-openai: DSML tool calls and thinking markers, over streamed deltas.

Every case is fed whole and split at random points (tokens end anywhere in the markup); the
results must agree, and no markup may ever reach the content.
"""

from __future__ import annotations

import json
import random

import pytest

from dsv4.client.openai_server.chat_output import ChatOutputParser
from dsv4.client.openai_server.dsml import ToolCallParser, render_tool_calls
from dsv4.client.openai_server.markers import DSML
from dsv4.client.openai_server.reasoning import ReasoningParser

WEATHER = {"name": "get_weather", "arguments": {"city": 'Paris "centre"\n', "days": 3, "units": {"t": "C"}}}
NOW = {"name": "now", "arguments": {}}


def splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def parse_tools(parts: list[str]) -> tuple[str, list[tuple[str, dict]], list]:
    parser = ToolCallParser(new_id=lambda: "call_x")
    content, pieces = [], []
    for part in [*parts, None]:
        text, deltas = parser.finish() if part is None else parser.feed(part)
        content.append(text)
        pieces += deltas
    # the streamed pieces of each call concatenate to its JSON arguments
    streamed: dict[int, str] = {}
    for piece in pieces:
        streamed[piece.index] = streamed.get(piece.index, "") + piece.arguments
    assert [streamed.get(i, "") for i in range(len(parser.calls))] == [c.arguments for c in parser.calls]
    return "".join(content), [(c.name, json.loads(c.arguments)) for c in parser.calls], pieces


CASES = {
    "two_calls_after_text": ("Let me check.\n\n" + render_tool_calls([WEATHER, NOW]),
                             "Let me check.", [("get_weather", WEATHER["arguments"]), ("now", {})]),
    "call_only": (render_tool_calls([NOW]), "", [("now", {})]),
    "v32_block_name": (render_tool_calls([NOW]).replace("tool_calls>", "function_calls>"), "", [("now", {})]),
    "no_markup": ("a < b and <b>bold</b>\n\nend\n", "a < b and <b>bold</b>\n\nend\n", []),
    "text_after_block": (render_tool_calls([NOW]) + "\ndone", "\ndone", [("now", {})]),
    "bad_json_value_kept_as_text": (
        f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="x" string="false">not json'
        f'</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>', "", [("f", {"x": "not json"})]),
    "cut_off_inside_a_value": (f'Hi\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="q" '
                               f'string="true">half an ans', "Hi", [("f", {"q": "half an ans"})]),
    "cut_off_inside_a_tag": (f'Hi<{DSML}tool_calls>\n<{DSML}inv', "Hi", []),
    "garbage_inside_block": (f'<{DSML}tool_calls>\nnoise <x>\n<{DSML}invoke name="f">\n</{DSML}invoke>\n'
                             f'</{DSML}tool_calls>', "", [("f", {})]),
}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", list(CASES))
def test_tool_calls_parse_the_same_however_the_text_is_split(name, seed):
    text, content, calls = CASES[name]
    whole = parse_tools([text])
    assert whole[:2] == (content, calls)
    split = parse_tools(splits(text, seed) if len(text) > 1 else [text])
    assert split[:2] == whole[:2]
    assert DSML not in split[0]


def test_first_piece_of_a_call_carries_id_and_name_only_once():
    _, _, pieces = parse_tools(splits(render_tool_calls([WEATHER, NOW]), 3))
    firsts = [p for p in pieces if p.id is not None]
    assert [(p.index, p.name, p.id) for p in firsts] == [(0, "get_weather", "call_x"), (1, "now", "call_x")]
    assert all(p.name is None for p in pieces if p.id is None)


@pytest.mark.parametrize("thinking, text, reasoning, content", [
    (True, "let me see</think>It is 4.", "let me see", "It is 4."),
    (True, "<think>again</think>ok", "again", "ok"),
    (True, "never finished", "never finished", ""),
    (False, "It is 4.", "", "It is 4."),
    (False, "  <think>hmm</think>It is 4.", "hmm", "It is 4."),
    (False, "<thin air", "", "<thin air"),
    (False, "x </think> y", "", "x </think> y"),
], ids=["thinking", "thinking_repeated_open", "thinking_cut_off", "chat", "chat_own_block", "chat_partial_marker",
        "chat_late_marker"])
@pytest.mark.parametrize("seed", range(4))
def test_reasoning_is_split_off_at_the_thinking_markers(thinking, text, reasoning, content, seed):
    parser = ReasoningParser(thinking)
    got = [parser.feed(part) for part in splits(text, seed)] + [parser.finish()]
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == (reasoning, content)


def test_chat_message_of_reasoning_then_tool_call():
    text = "I should look it up.</think>Checking.\n\n" + render_tool_calls([WEATHER])
    parser = ChatOutputParser(thinking=True)
    deltas = [parser.feed(part) for part in splits(text, 1)] + [parser.finish()]
    message = parser.message()
    assert message["reasoning_content"] == "I should look it up." and message["content"] == "Checking."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == WEATHER["arguments"]
    streamed = [d.as_openai() for d in deltas if d]
    assert "".join(d.get("content", "") for d in streamed) == "Checking."
    assert "".join(tc["function"]["arguments"] for d in streamed for tc in d.get("tool_calls", ())) == \
        call["function"]["arguments"]


def test_tool_calls_only_leave_content_null():
    parser = ChatOutputParser(thinking=False)
    parser.feed(render_tool_calls([NOW]))
    parser.finish()
    assert parser.message()["content"] is None and parser.has_tool_calls
