"""Per-request output bookkeeping: tokens -> text deltas, stop strings, EOS, max_tokens, finish reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tokenizer import IncrementalDetokenizer, StopMatcher, TextCodec
from .request import RequestConfig


@dataclass(frozen=True)
class OutputChunk:
    """One response's content: the text and token ids added since the previous chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "" while running; "stop", "length", "cancelled" or "shutdown" at the end
    num_input_tokens: int
    num_output_tokens: int  # cumulative

    @property
    def final(self) -> bool:
        return bool(self.finish_reason)


@dataclass
class TextState:
    """Feeds sampled tokens through detokenization and stop matching; decides when to stop."""

    config: RequestConfig
    codec: TextCodec
    eos_ids: frozenset[int]
    generated: list[int] = field(default_factory=list)
    finish_reason: str = ""
    _detok: IncrementalDetokenizer = field(init=False)
    _stops: StopMatcher = field(init=False)
    _text: list[str] = field(default_factory=list)
    _pending_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.codec)
        self._stops = StopMatcher(self.config.stop)

    @property
    def banned(self) -> list[int]:
        """Token ids the sampler must not produce now (EOS before min_tokens)."""
        return sorted(self.eos_ids) if len(self.generated) < self.config.min_tokens else []

    def push(self, token: int) -> OutputChunk | None:
        """Account for one sampled token; returns the chunk to send now (None: nothing yet)."""
        if token in self.eos_ids:
            return self._finish("stop", self._drain())
        self.generated.append(token)
        self._pending_ids.append(token)
        result = self._stops.push(self._detok.push(token))
        if result.stopped:
            return self._finish("stop", result.text)
        if len(self.generated) >= self.config.max_tokens:
            return self._finish("length", result.text + self._drain())
        return self._emit(result.text)

    def cancel(self) -> OutputChunk:
        return self._finish("cancelled", "")

    def cut(self) -> OutputChunk:
        """End a stream early because the server is shutting down (finish_reason "shutdown")."""
        return self._finish("shutdown", "")

    def _drain(self) -> str:
        tail = self._detok.flush()
        result = self._stops.push(tail) if tail else None
        if result is not None and result.stopped:
            self.finish_reason = "stop"
            return result.text
        return (result.text if result else "") + self._stops.flush()

    def _emit(self, text: str) -> OutputChunk | None:
        self._text.append(text)
        if not self.config.stream:
            return None
        return self._chunk(text, "")

    def _finish(self, reason: str, text: str) -> OutputChunk:
        self.finish_reason = self.finish_reason or reason
        self._text.append(text)
        if self.config.stream:
            return self._chunk(text, self.finish_reason)
        whole = "".join(self._text)
        if self.config.echo_text is not None:
            whole = self.config.echo_text + whole
        self._pending_ids = list(self.generated)
        return self._chunk(whole, self.finish_reason)

    def _chunk(self, text: str, reason: str) -> OutputChunk:
        ids, self._pending_ids = self._pending_ids, []
        return OutputChunk(text, ids, reason, self.config.num_input_tokens, len(self.generated))


def coalesce(items: list[tuple[int, OutputChunk | None, tuple | None]]) -> list[tuple[int, OutputChunk | None, tuple | None]]:
    """(request id, chunk, error) items in arrival order -> one response per request where possible.

    A stream's chunks that queued up behind a slow client path go out as one response (the texts and
    token ids joined; counts and finish reason from the latest), so a large batch costs one send per
    request per drain, not one per token. Errors are never merged; each request's order is kept.
    """
    out: list[tuple[int, OutputChunk | None, tuple | None]] = []
    open_at: dict[int, int] = {}  # request id -> index of its latest item, while that item may absorb more
    for rid, chunk, error in items:
        at = open_at.pop(rid, None)
        if at is not None and error is None:
            head = out[at][1]
            out[at] = (rid, OutputChunk(head.text + chunk.text, head.token_ids + chunk.token_ids, chunk.finish_reason,
                                        chunk.num_input_tokens, chunk.num_output_tokens), None)
            if not chunk.final:
                open_at[rid] = at
            continue
        out.append((rid, chunk, error))
        if error is None and not chunk.final:
            open_at[rid] = len(out) - 1
    return out
