"""Request bodies of the OpenAI endpoints, validated by pydantic (strict types).

Names, types and ranges follow OpenAI's API reference, plus the vLLM extensions benchmark tools
send (`top_k`, `min_tokens`, `ignore_eos`, `return_token_ids`, `chat_template_kwargs`). A field
this server cannot honour is refused with a 400 naming it rather than ignored, so no client gets
silently different output; unknown fields are ignored, as other OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

UINT64_MAX = (1 << 64) - 1


def _refuse(value: Any, default: Any, what: str) -> Any:
    if value not in (None, default):
        raise ValueError(f"{what} is not supported by this server")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _only_text(self) -> TextPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text parts are supported, got type {self.type!r}")
        return self


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class Sampling(_Body):
    """What both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (one choice per request; send {n} requests instead)")
        return n

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        return _refuse(value, 0.0, "a non-zero penalty")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return _refuse(value or None, None, "logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_text_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ValueError("give one prompt string (token-id prompts and batches are not supported)")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _refuse(value, None, "suffix (fill-in-the-middle)")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _refuse(value, 1, "best_of > 1")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _refuse(value, 0, "logprobs")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _auto_only(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value not in (None, "auto", "none"):
            raise ValueError("only 'auto' and 'none' are supported (the model cannot be forced to call a tool)")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported (no JSON mode or schema-constrained output)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _refuse(value, False, "logprobs")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        return _refuse(value, 0, "top_logprobs")

    def wants_thinking(self, default: bool) -> bool:
        """Thinking mode from `chat_template_kwargs.thinking` (vLLM, SGLang) or DeepSeek's `thinking.type`."""
        kwargs = self.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if isinstance(kwargs.get(key), bool):
                return kwargs[key]
        if self.thinking is not None:
            return self.thinking.get("type") == "enabled"
        return default

    def active_tools(self) -> list[dict[str, Any]]:
        """Tools rendered into the prompt: none when `tool_choice` is "none"."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


def field_names() -> frozenset[str]:
    """Every field name of these bodies, to turn a pydantic error location into an OpenAI `param`."""
    names: set[str] = set()
    for model in (StreamOptions, TextPart, FunctionCall, ToolCall, FunctionDefinition, Tool, Message,
                  CompletionRequest, ChatCompletionRequest):
        names.update(model.model_fields)
    return frozenset(names)
