"""Load-test scenarios: what each simulated user sends, how often, and when it gives up.

A scenario is a JSON file in ``load_tests/scenarios/`` (or any path)::

    {
      "name": "mixed",
      "description": "...",
      "seed": 1,
      "timeout_s": 300,
      "sampling": {"temperature": 0.0},              # defaults for every request kind
      "requests": [                                  # request kinds, drawn by weight
        {"name": "chat", "weight": 7, "max_tokens": 64,
         "prompt": {"kind": "list", "chat": true, "texts": ["...", "..."]}},
        {"name": "long", "weight": 1, "max_tokens": 128,
         "prompt": {"kind": "synthetic", "words": 4500, "seed": 7, "unique_prefix": true,
                    "instruction": "Summarise the text above in two sentences."}}
      ],                                             # a kind's "min_tokens": at least that many (EOS ignored)
      "pacing": {"kind": "closed", "think_time_s": 0.0}     # or {"kind": "poisson", "rate_per_s": 2.0}
      "cancel": {"probability": 0.5, "min_tokens": 1, "max_tokens": 32}   # optional
    }

Prompts are deterministic: the same scenario and seed always produce the same requests.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.client import ChatMessage, GenerationRequest

__all__ = [
    "CancelSpec",
    "Pacer",
    "Pacing",
    "PromptSpec",
    "RequestSpec",
    "Scenario",
    "list_scenarios",
    "load_scenario",
    "synthetic_text",
]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out up who said about "
    "what its into than them only other time new some could these two may first then do any like my now over "
    "such our man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three system model memory cache token server request "
    "stream latency batch kernel tensor layer window attention compress index expert route sample decode prefill "
    "queue thread signal network storage engine measure result design number value table block page river "
    "mountain city garden window paper letter music story market winter summer bridge forest ocean island"
).split()


def synthetic_text(words: int, seed: int) -> str:
    """``words`` pseudo-English words in sentences, the same for the same ``seed``.

    The DeepSeek tokenizer makes about 1.08 tokens of it per word (4,000 words -> 4,306 tokens).
    """
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < words:
        n = min(rng.randint(8, 20), words - len(out))
        sentence = [rng.choice(_WORDS) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "." if rng.random() < 0.85 else ","
        out.extend(sentence)
    return " ".join(out)


@dataclass(frozen=True)
class PromptSpec:
    kind: str  # "list" or "synthetic"
    texts: tuple[str, ...] = ()
    chat: bool = False
    system: str | None = None
    words: int = 0
    seed: int = 0
    unique_prefix: bool = False
    instruction: str = ""

    def __post_init__(self) -> None:
        if self.kind == "list" and not self.texts:
            raise ValueError("a 'list' prompt needs texts")
        if self.kind == "synthetic" and self.words <= 0:
            raise ValueError("a 'synthetic' prompt needs words > 0")
        if self.kind not in ("list", "synthetic"):
            raise ValueError(f"unknown prompt kind {self.kind!r}")


@dataclass(frozen=True)
class RequestSpec:
    name: str
    prompt: PromptSpec
    max_tokens: int
    weight: float = 1.0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int | None = None  # = max_tokens: every request generates exactly that many (EOS ignored)

    def __post_init__(self) -> None:
        if self.min_tokens is not None and not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"request {self.name!r}: min_tokens must be between 0 and max_tokens ({self.max_tokens})")


@dataclass(frozen=True)
class Pacing:
    kind: str = "closed"  # "closed": next request when the last ends; "poisson": open-loop arrivals
    think_time_s: float = 0.0
    rate_per_s: float = 0.0  # poisson: total arrival rate over all users

    def __post_init__(self) -> None:
        if self.kind not in ("closed", "poisson"):
            raise ValueError(f"unknown pacing {self.kind!r}")
        if self.kind == "poisson" and self.rate_per_s <= 0:
            raise ValueError("poisson pacing needs rate_per_s > 0")


@dataclass(frozen=True)
class CancelSpec:
    probability: float
    min_tokens: int = 1
    max_tokens: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0 or not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("cancel needs 0 <= probability <= 1 and 1 <= min_tokens <= max_tokens")


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: tuple[RequestSpec, ...]
    description: str = ""
    pacing: Pacing = field(default_factory=Pacing)
    cancel: CancelSpec | None = None
    seed: int = 0
    timeout_s: float = 300.0

    def pick(self, rng: random.Random) -> RequestSpec:
        return rng.choices(self.requests, weights=[r.weight for r in self.requests])[0]

    def cancel_after(self, rng: random.Random) -> int | None:
        """After how many output tokens this request is abandoned (None: let it finish)."""
        if self.cancel is None or rng.random() >= self.cancel.probability:
            return None
        return rng.randint(self.cancel.min_tokens, self.cancel.max_tokens)

    def build_request(self, spec: RequestSpec, rng: random.Random, serial: int) -> GenerationRequest:
        p = spec.prompt
        if p.kind == "list":
            text = rng.choice(p.texts)
        else:
            text = synthetic_text(p.words, p.seed)
            if p.instruction:
                text = f"{text}\n\n{p.instruction}"
        if p.unique_prefix:
            # defeats prefix caching so every request pays the full prefill
            text = f"[request {serial}-{rng.getrandbits(32):08x}] {text}"
        common: dict[str, Any] = dict(
            max_tokens=spec.max_tokens, min_tokens=spec.min_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
            seed=spec.seed, stop=spec.stop, timeout_s=self.timeout_s,
        )
        if p.chat:
            messages = [ChatMessage("system", p.system)] if p.system else []
            messages.append(ChatMessage("user", text))
            return GenerationRequest(messages=tuple(messages), **common)
        return GenerationRequest(prompt=text, **common)


def _prompt(obj: dict[str, Any]) -> PromptSpec:
    obj = dict(obj)
    if "texts" in obj:
        obj["texts"] = tuple(obj["texts"])
    return PromptSpec(**obj)


def _request_spec(obj: dict[str, Any], sampling: dict[str, Any]) -> RequestSpec:
    merged = {**sampling, **obj}
    merged["prompt"] = _prompt(merged["prompt"])
    merged["stop"] = tuple(merged.get("stop", ()))
    return RequestSpec(**merged)


def scenario_from_dict(obj: dict[str, Any]) -> Scenario:
    sampling = obj.get("sampling", {})
    requests = tuple(_request_spec(r, sampling) for r in obj["requests"])
    if not requests:
        raise ValueError("a scenario needs at least one request kind")
    cancel = obj.get("cancel")
    return Scenario(
        name=obj["name"],
        description=obj.get("description", ""),
        requests=requests,
        pacing=Pacing(**obj.get("pacing", {})),
        cancel=CancelSpec(**cancel) if cancel else None,
        seed=int(obj.get("seed", 0)),
        timeout_s=float(obj.get("timeout_s", 300.0)),
    )


def list_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.json"))


def scenario_path(name_or_path: str) -> Path:
    """``scenarios/<name>.json`` or the JSON file path given."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no scenario {name_or_path!r}; known: {', '.join(list_scenarios())}")
    return path


def load_scenario(name_or_path: str) -> Scenario:
    """Load ``scenarios/<name>.json`` or a JSON file path."""
    return scenario_from_dict(json.loads(scenario_path(name_or_path).read_text()))


class Pacer:
    """Per-user waits. Closed loop: a fixed think time. Poisson: each user starts requests with
    exponential gaps of mean ``users / rate``, so all users together approximate Poisson arrivals
    at ``rate``; a user still busy when its next arrival is due starts at once and the start is
    counted in ``late``.
    """

    def __init__(self, pacing: Pacing, rng: random.Random, users: int, clock: Any = time.monotonic) -> None:
        self.pacing = pacing
        self.rng = rng
        self.users = max(1, users)
        self.clock = clock
        self.late = 0
        self._last_start: float | None = None

    def started(self) -> None:
        self._last_start = self.clock()

    def wait_s(self) -> float:
        if self.pacing.kind == "closed":
            return self.pacing.think_time_s
        gap = self.rng.expovariate(self.pacing.rate_per_s / self.users)
        if self._last_start is None:
            return gap
        elapsed = self.clock() - self._last_start
        if elapsed > gap:
            self.late += 1
            return 0.0
        return gap - elapsed
