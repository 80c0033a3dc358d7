"""A chat answer's text, as it streams, split into reasoning, content and tool calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dsml import ToolCallDelta, ToolCallParser
from .reasoning import ReasoningParser


@dataclass(frozen=True)
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def as_openai(self) -> dict[str, Any]:
        """The `delta` of a `chat.completion.chunk`."""
        delta: dict[str, Any] = {}
        if self.reasoning:
            delta["reasoning_content"] = self.reasoning
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [_tool_call_piece(piece) for piece in self.tool_calls]
        return delta


def _tool_call_piece(piece: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": piece.index, "function": {"arguments": piece.arguments}}
    if piece.id is not None:
        out.update(id=piece.id, type="function")
        out["function"]["name"] = piece.name
    return out


def _merged(pieces: list[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """Consecutive pieces of one call as one (fewer, larger chunks)."""
    out: list[ToolCallDelta] = []
    for piece in pieces:
        if out and out[-1].index == piece.index and piece.id is None:
            last = out[-1]
            out[-1] = ToolCallDelta(last.index, last.arguments + piece.arguments, last.id, last.name)
        else:
            out.append(piece)
    return tuple(out)


class ChatOutputParser:
    """Feed the answer's text deltas; each call returns what can be shown now. One per response."""

    def __init__(self, thinking: bool) -> None:
        self._reasoning = ReasoningParser(thinking)
        self._tools = ToolCallParser()
        self._parts = {"reasoning": [], "content": []}

    def feed(self, text: str) -> ChatDelta:
        reasoning, answer = self._reasoning.feed(text)
        content, calls = self._tools.feed(answer)
        return self._record(reasoning, content, calls)

    def finish(self) -> ChatDelta:
        reasoning, answer = self._reasoning.finish()
        content, calls = self._tools.feed(answer)
        tail, more_calls = self._tools.finish()
        return self._record(reasoning, content + tail, calls + more_calls)

    def _record(self, reasoning: str, content: str, calls: list[ToolCallDelta]) -> ChatDelta:
        self._parts["reasoning"].append(reasoning)
        self._parts["content"].append(content)
        return ChatDelta(reasoning, content, _merged(calls))

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._tools.calls)

    def message(self) -> dict[str, Any]:
        """The whole answer as an assistant `message` (call after `finish`)."""
        content = "".join(self._parts["content"])
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if self.has_tool_calls else "")}
        reasoning = "".join(self._parts["reasoning"])
        if reasoning:
            message["reasoning_content"] = reasoning
        if self.has_tool_calls:
            message["tool_calls"] = [call.as_openai() for call in self._tools.calls]
        return message
