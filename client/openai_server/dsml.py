"""DeepSeek-V4 tool calls in DSML: rendering past calls into a prompt, and parsing streamed output.

The model writes its calls after the answer text, as

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

`string="true"` values are raw text, others JSON. DeepSeek-V3.2 named the block `function_calls`;
both are accepted. The parser turns the markup into OpenAI tool calls whose `arguments` is a JSON
object text, streamed as it is read; none of the markup ever reaches the answer text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .markers import DSML, held_suffix_len

BLOCK_START = f"<{DSML}tool_calls>"
BLOCK_END = f"</{DSML}tool_calls>"
BLOCK_STARTS = (BLOCK_START, f"<{DSML}function_calls>")
BLOCK_ENDS = (BLOCK_END, f"</{DSML}function_calls>")
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"
_INVOKE_HEAD = re.compile(rf'<{DSML}invoke\s+name="([^"]*)"\s*>')
_PARAM_HEAD = re.compile(rf'<{DSML}parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>')
# a tag head longer than this without its '>' is garbage, not a head still arriving
_MAX_HEAD_CHARS = 1024


def render_tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant turn's past calls (name + arguments object each) as the DSML block."""
    invokes = []
    for call in calls:
        params = "\n".join(
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f"{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}</{DSML}parameter>"
            for key, value in call["arguments"].items()
        )
        invokes.append(f'<{DSML}invoke name="{call["name"]}">\n{params}\n{INVOKE_CLOSE}')
    return f"{BLOCK_START}\n" + "\n".join(invokes) + f"\n{BLOCK_END}"


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: `id` and `name` come with its first piece only."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _escaped(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _json_value(raw: str) -> str:
    raw = raw.strip()
    if not raw:
        return "null"
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except ValueError:
        # string="false" but not JSON: keep the text rather than emit broken arguments
        return json.dumps(raw, ensure_ascii=False)


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Feed answer text in order; each call returns (content now final, tool-call pieces).

    Text that may still turn into markup (a partial `<｜DSML｜...` tag, the newlines before the
    block) is held back until it is decided. Concatenating every piece's `arguments` of one index
    gives that call's JSON object text. One instance per response; not thread-safe.
    """

    def __init__(self, new_id: Callable[[], str] = _new_call_id) -> None:
        self._new_id = new_id
        self._buf = ""
        self._state = "content"  # content | block | invoke | value
        self._value_is_string = False
        self._raw_value = ""
        self._params = 0
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the output: held text is content again; an open call is closed."""
        return self._run(final=True)

    def _emit(self, out: list[ToolCallDelta], arguments: str, *, name: str | None = None) -> None:
        if name is not None:
            self.calls.append(ToolCall(self._new_id(), name))
            out.append(ToolCallDelta(len(self.calls) - 1, arguments, self.calls[-1].id, name))
        else:
            out.append(ToolCallDelta(len(self.calls) - 1, arguments))
        self.calls[-1].arguments += arguments

    def _run(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        step = {"content": self._content, "block": self._block, "invoke": self._invoke, "value": self._value}
        while step[self._state](content, deltas, final):
            pass
        if final:
            if self._state == "invoke":  # the output ended inside a call: close its arguments
                self._close_call(deltas)
            self._buf = ""  # an unfinished tag is markup, never answer text
        return "".join(content), deltas

    # each step consumes what it can and returns True to run again, False when it needs more text

    def _content(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        hits = [(i, m) for m in BLOCK_STARTS if (i := self._buf.find(m)) >= 0]
        if hits:
            start, marker = min(hits)
            content.append(self._buf[:start].rstrip("\n"))
            self._buf, self._state = self._buf[start + len(marker):], "block"
            return True
        cut = len(self._buf) - (0 if final else held_suffix_len(self._buf, BLOCK_STARTS))
        if not final:
            # the newlines before a block separate it from the answer: held until decided
            while cut > 0 and self._buf[cut - 1] == "\n":
                cut -= 1
        content.append(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _skip(self, final: bool, expected: Sequence[str]) -> bool | None:
        """Drop whitespace and stray text before the next tag: None when one of `expected` starts
        here, else the step's answer (False: wait for more text)."""
        self._buf = self._buf.lstrip()
        if not self._buf:
            return False
        if any(tag.startswith(self._buf) for tag in expected) and not final:
            return False  # a tag still arriving
        if any(self._buf.startswith(tag) for tag in expected):
            return None
        # text the format does not allow here is dropped, never shown
        next_tag = self._buf.find("<", 1)
        self._buf = "" if next_tag < 0 else self._buf[next_tag:]
        return bool(self._buf)

    def _block(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        skipped = self._skip(final, (INVOKE_OPEN, *BLOCK_ENDS))
        if skipped is not None:
            return skipped
        for end in BLOCK_ENDS:
            if self._buf.startswith(end):
                self._buf, self._state = self._buf[len(end):], "content"
                return True
        head = _INVOKE_HEAD.match(self._buf)
        if head is None:
            return self._bad_head(final)
        self._buf, self._state, self._params = self._buf[head.end():], "invoke", 0
        self._emit(deltas, "", name=head.group(1))
        return True

    def _invoke(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        skipped = self._skip(final, (PARAM_OPEN, INVOKE_CLOSE, INVOKE_OPEN, *BLOCK_ENDS))
        if skipped is not None:
            return skipped
        if not self._buf.startswith(PARAM_OPEN):
            # </invoke>; or the next call or the block's end came with this call still open
            if self._buf.startswith(INVOKE_CLOSE):
                self._buf = self._buf[len(INVOKE_CLOSE):]
            self._close_call(deltas)
            return True
        head = _PARAM_HEAD.match(self._buf)
        if head is None:
            return self._bad_head(final)
        name, is_string = head.group(1), head.group(2) == "true"
        opening = ("{" if self._params == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": "
        self._emit(deltas, opening + ('"' if is_string else ""))
        self._buf, self._state = self._buf[head.end():], "value"
        self._value_is_string, self._raw_value = is_string, ""
        self._params += 1
        return True

    def _value(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        end = self._buf.find(PARAM_CLOSE)
        closed = end >= 0 or final
        if end >= 0:
            piece, self._buf = self._buf[:end], self._buf[end + len(PARAM_CLOSE):]
        else:
            cut = len(self._buf) - (0 if final else held_suffix_len(self._buf, (PARAM_CLOSE,)))
            piece, self._buf = self._buf[:cut], self._buf[cut:]
        if self._value_is_string:
            # string values stream as they arrive; other values are short and checked as JSON once whole
            text = _escaped(piece) + ('"' if closed else "")
            if text:
                self._emit(deltas, text)
        else:
            self._raw_value += piece
            if closed:
                self._emit(deltas, _json_value(self._raw_value))
        if closed:
            self._state = "invoke"
        return closed

    def _close_call(self, deltas: list[ToolCallDelta]) -> None:
        self._emit(deltas, "}" if self._params else "{}")
        self._state = "block"

    def _bad_head(self, final: bool) -> bool:
        """A tag that should be a head but does not parse: wait for its '>' or drop it."""
        close = self._buf.find(">")
        if close < 0 and len(self._buf) < _MAX_HEAD_CHARS and not final:
            return False
        self._buf = "" if close < 0 else self._buf[close + 1:]
        return bool(self._buf)
