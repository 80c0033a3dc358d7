"""A generation request as it crosses the ensemble: parsed from input tensors, validated once.

The tokenizer stage validates and encodes; prefill and decode receive the result as
`input_ids` plus this JSON `request_config`, so they never re-check user input.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..sampler import SamplingParams


class RequestError(ValueError):
    """Bad user input; reaches the client as INVALID_ARG with this message (naming the field)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{shorten(field_name)}: {message}")
        self.field = field_name


def shorten(name: str, limit: int = 64) -> str:
    """A client-chosen name as it appears in a message: a 100 MB key must not come back whole."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


@dataclass(frozen=True)
class ServingLimits:
    max_model_len: int
    max_prompt_tokens: int
    max_tokens_limit: int
    default_max_tokens: int = 16


@dataclass(frozen=True)
class RequestConfig:
    """What prefill and decode need besides the token ids (travels as JSON)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    echo_text: str | None = None  # prompt text prepended to a non-streamed answer
    num_input_tokens: int = 0
    arrival_time: float = 0.0  # wall clock at the tokenizer, for time-to-first-token

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              max_tokens=self.max_tokens, stop=self.stop)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> RequestConfig:
        data = json.loads(raw)
        data["stop"] = tuple(data.get("stop", ()))
        return cls(**data)


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any | None:
    if name not in inputs or inputs[name] is None:
        return None
    arr = np.asarray(inputs[name])
    if arr.size != 1:
        raise RequestError(name, f"expected one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, str):
        return value
    raise RequestError(name, f"expected a string, got {type(value).__name__}")


def _number(inputs, name: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, integer: bool = False) -> Any:
    value = _scalar(inputs, name)
    if value is None:
        return default
    number = float(value)
    if not math.isfinite(number):
        raise RequestError(name, f"must be a finite number, got {number}")
    if lo is not None and (number <= lo if lo_open else number < lo):
        raise RequestError(name, f"must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and number > hi:
        raise RequestError(name, f"must be <= {hi}, got {value}")
    return int(value) if integer else number


RESERVED_PARAMETERS = ("sequence_id", "priority", "timeout", "sequence_start", "sequence_end", "headers")
INPUT_NAMES = ("text_input", "max_tokens", "min_tokens", "stream", "temperature", "top_p", "top_k", "seed",
               "stop_words", "exclude_input_in_output", "apply_chat_template")
# a token is rarely longer than this many characters: longer texts cannot fit and are refused unread
MAX_CHARS_PER_TOKEN = 32


# the generate extension's request `id` arrives as a parameter; it only labels the request
HARMLESS_PARAMETERS = ("id",)


def check_parameters(parameters: dict[str, Any]) -> None:
    """Request parameters are not used by this model; a misspelled input would otherwise vanish silently."""
    parameters = {k: v for k, v in parameters.items() if k not in HARMLESS_PARAMETERS}
    for name in parameters:
        if name in RESERVED_PARAMETERS or name.startswith("triton_"):
            raise RequestError(name, "is a reserved Triton parameter name and cannot be used with this model")
    if parameters:
        names = sorted(parameters)
        shown = [shorten(n) for n in names[:8]] + ([f"... {len(names) - 8} more"] if len(names) > 8 else [])
        raise RequestError(names[0], f"unknown request parameter(s) {shown}; "
                           f"this model takes the inputs {list(INPUT_NAMES)}")


def parse_request(inputs: dict[str, np.ndarray], limits: ServingLimits) -> tuple[str | list[dict], RequestConfig, bool]:
    """Validate raw input tensors -> (prompt text or chat messages, config, apply_chat_template).

    The prompt's token count is checked later, after encoding (`check_prompt_length`).
    """
    raw = _scalar(inputs, "text_input")
    if raw is None:
        raise RequestError("text_input", "is required")
    text = _text(raw, "text_input")
    if len(text) > MAX_CHARS_PER_TOKEN * limits.max_prompt_tokens:
        raise RequestError("text_input", f"has {len(text)} characters, far more than the prompt limit of "
                           f"{limits.max_prompt_tokens} tokens")
    chat = bool(_scalar(inputs, "apply_chat_template") or False)
    prompt: str | list[dict] = text
    if chat:
        try:
            prompt = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError("text_input", f"with apply_chat_template must be a JSON list of messages: {exc}") from None
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("text_input", "with apply_chat_template must be a non-empty JSON list of messages")
    elif not text.strip():
        raise RequestError("text_input", "must not be empty")
    max_tokens = _number(inputs, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens_limit, integer=True)
    stream = bool(_scalar(inputs, "stream") or False)
    exclude = _scalar(inputs, "exclude_input_in_output")
    if stream and exclude is not None and not bool(exclude):
        raise RequestError("exclude_input_in_output", "false is not supported with stream=true (streams never echo the prompt)")
    seed = _scalar(inputs, "seed")
    if seed is not None and int(seed) < 0:
        raise RequestError("seed", f"must be >= 0, got {seed}")
    stops = tuple(_text(s, "stop_words") for s in np.asarray(inputs["stop_words"]).reshape(-1)) if inputs.get("stop_words") is not None else ()
    if any(not s for s in stops):
        raise RequestError("stop_words", "must not contain empty strings")
    config = RequestConfig(
        max_tokens=max_tokens,
        temperature=_number(inputs, "temperature", 1.0, 0.0),
        top_p=_number(inputs, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_number(inputs, "top_k", 0, 0, integer=True),
        seed=None if seed is None else int(seed),
        min_tokens=_number(inputs, "min_tokens", 0, 0, max_tokens, integer=True),
        stop=stops,
        stream=stream,
        echo_text=None if stream or (exclude is not None and bool(exclude)) or chat else text,
    )
    return prompt, config, chat


def check_prompt_length(num_tokens: int, config: RequestConfig, limits: ServingLimits) -> None:
    if num_tokens > limits.max_prompt_tokens:
        raise RequestError("text_input", f"prompt has {num_tokens} tokens, more than the limit of {limits.max_prompt_tokens}")
    if num_tokens + config.max_tokens > limits.max_model_len:
        raise RequestError("max_tokens", f"prompt ({num_tokens} tokens) + max_tokens ({config.max_tokens}) exceeds the "
                           f"model's context of {limits.max_model_len} tokens")
