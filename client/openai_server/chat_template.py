"""OpenAI chat messages (and tools) rendered as a DeepSeek-V4 prompt.

V4 ships its chat format as code, not as a Jinja template in `tokenizer_config.json` (the
packaged tokenizer has none), so it is written out here:

    <｜begin▁of▁sentence｜>{system}\n\n{tools}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>...
    ...<｜User｜>{user}<｜Assistant｜></think>          (chat mode: the answer follows)
    ...<｜User｜>{user}<｜Assistant｜><think>           (thinking mode: reasoning, </think>, answer)

Tool results (role "tool") form a user turn of `<tool_result>` blocks; past tool calls are
rendered in DSML after the assistant's text. For system, user and assistant messages alone this
is exactly the text the server's own `apply_chat_template` builds (a test holds the two equal),
so a chat request gets the same prompt tokens whichever way it reaches Triton.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .dsml import BLOCK_END, BLOCK_START, INVOKE_CLOSE, PARAM_CLOSE, render_tool_calls
from .markers import ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER


class TemplateError(ValueError):
    """A conversation the format cannot express; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


_TOOLS_PROMPT = """## Tools

You can call the tools listed below. To call one or more of them, end your answer with one block in this form:

{start}
<{dsml}invoke name="TOOL_NAME">
<{dsml}parameter name="PARAMETER_NAME" string="true|false">VALUE{param_close}
...
{invoke_close}
...
{end}

For a string parameter set string="true" and write the value as it is; for any other type (number, boolean, array, object) set string="false" and write the value as JSON.

In thinking mode (after {think_start}), reason inside {think_start}...{think_end} first, then write the answer and any tool calls. Otherwise write them directly after {think_end}.

### Available tools

{schemas}

Use only these tool names and parameters."""


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt section that describes `tools` (OpenAI `{"type": "function", "function": ...}`)."""
    schemas = "\n".join(json.dumps(dict(tool["function"]), ensure_ascii=False) for tool in tools)
    return _TOOLS_PROMPT.format(start=BLOCK_START, end=BLOCK_END, dsml=DSML, param_close=PARAM_CLOSE,
                                invoke_close=INVOKE_CLOSE, think_start=THINK_START, think_end=THINK_END,
                                schemas=schemas)


def _text(index: int, message: Mapping[str, Any], *, required: bool = True) -> str:
    content = message.get("content")
    if content is None:
        if required:
            raise TemplateError(f"messages[{index}].content", f"is required for role {message.get('role')!r}")
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for number, part in enumerate(content):
        if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise TemplateError(f"messages[{index}].content[{number}]", "only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)


def _past_calls(index: int, message: Mapping[str, Any]) -> str:
    calls = []
    for number, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise TemplateError(f"messages[{index}].tool_calls[{number}].function.arguments", "must be a JSON object")
        calls.append({"name": function["name"], "arguments": arguments})
    return "\n\n" + render_tool_calls(calls) if calls else ""


def render_prompt(messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] = (),
                  thinking: bool = False) -> str:
    """The prompt text for `messages`, ending where the model's answer begins.

    System (and developer) messages must come first. In thinking mode an assistant turn keeps its
    `reasoning_content` when tools are in play or when it follows the last user turn; earlier
    reasoning is dropped, as the model was trained.
    """
    if not messages:
        raise TemplateError("messages", "must not be empty")
    system: list[str] = []
    turns: list[str] = []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "tool")), default=-1)
    tool_turn_open = False  # the last turn is a user turn of tool results, which later ones join
    for index, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise TemplateError(f"messages[{index}].role", "system messages must come before user and assistant turns")
            system.append(_text(index, message))
        elif role == "tool":
            block = f"<tool_result>{_text(index, message)}</tool_result>"
            if tool_turn_open:
                turns[-1] += "\n\n" + block
            else:
                turns.append(USER + block)
            tool_turn_open = True
        elif role == "user":
            if tool_turn_open:
                turns[-1] += "\n\n" + _text(index, message)
            else:
                turns.append(USER + _text(index, message))
            tool_turn_open = False
        elif role == "assistant":
            calls = _past_calls(index, message)
            answer = _text(index, message, required=not calls)
            if thinking and (tools or index > last_user):
                opening = THINK_START + (message.get("reasoning_content") or "") + THINK_END
            else:
                opening = THINK_END
            turns.append(ASSISTANT + opening + answer + calls + EOS)
            tool_turn_open = False
        else:
            raise TemplateError(f"messages[{index}].role", f"{role!r} is not one of system, developer, user, assistant, tool")
    if tools:
        system.append(render_tools(tools))
    return BOS + "\n\n".join(system) + "".join(turns) + ASSISTANT + (THINK_START if thinking else THINK_END)
