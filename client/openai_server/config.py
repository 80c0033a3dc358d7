"""Settings of the OpenAI front end, fixed at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class OpenAIServerConfig:
    """What the application needs; where it listens is uvicorn's business (see `cli`).

    `api_keys` empty means no key is asked for (loopback only: the CLI refuses otherwise).
    `request_timeout_s` bounds a whole request on the Triton side (None: no bound).
    """

    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "dsv4"
    model_names: tuple[str, ...] = ("dsv4",)
    api_keys: frozenset[str] = frozenset()
    default_max_tokens: int = 512
    thinking: bool = False
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.model_names or not all(self.model_names):
            raise ValueError("at least one non-empty served model name is needed")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ValueError("API keys must be non-empty and carry no surrounding whitespace")

    @property
    def default_model(self) -> str:
        return self.model_names[0]


def read_api_keys(path: Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    keys = frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys
