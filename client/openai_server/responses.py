"""Response bodies and server-sent events in OpenAI's shapes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Envelope:
    """What every body and chunk of one response repeats: id, object type, creation time, model."""

    id: str
    object: str  # "text_completion" | "chat.completion"
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chunk_object(self) -> str:
        # completions stream "text_completion" chunks; chat streams "chat.completion.chunk"
        return "chat.completion.chunk" if self.object == "chat.completion" else self.object

    def body(self, choice: dict[str, Any], usage_counts: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}], "usage": usage_counts}

    def chunk(self, choice: dict[str, Any], *, with_usage: bool = False) -> dict[str, Any]:
        out = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
               "choices": [{"index": 0, **choice}]}
        if with_usage:
            out["usage"] = None  # OpenAI's convention: usage is null until the last chunk
        return out

    def usage_chunk(self, usage_counts: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_counts}


def models_list(names: tuple[str, ...], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created) for name in names]}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "dsv4-triton"}
