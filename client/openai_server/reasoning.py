"""Split streamed model text into reasoning (inside the thinking markers) and the answer.

In thinking mode the prompt ends with `<think>`, so the model's text is reasoning until it writes
`</think>`. In chat mode the prompt ends with `</think>` and the text is the answer, unless the
model opens a `<think>` block of its own at the very start.
"""

from __future__ import annotations

from .markers import THINK_END, THINK_START, held_suffix_len


class ReasoningParser:
    """Feed text deltas in order; each call returns the (reasoning, content) that is now final.

    One instance per response; not thread-safe.
    """

    def __init__(self, thinking: bool) -> None:
        self._state = "reasoning_start" if thinking else "start"
        self._buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        """Release whatever was held back (a marker that never completed is plain text)."""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf or final:
            if self._state in ("start", "reasoning_start"):
                # a leading <think> opens reasoning (chat mode) or repeats the prompt's (thinking mode)
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK_START):
                    self._buf, self._state = stripped[len(THINK_START):], "reasoning"
                    continue
                if THINK_START.startswith(stripped) and not final:
                    break
                self._state = "reasoning" if self._state == "reasoning_start" else "content"
            elif self._state == "reasoning":
                end = self._buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(self._buf[:end])
                    self._buf, self._state = self._buf[end + len(THINK_END):], "content"
                    continue
                keep = 0 if final else held_suffix_len(self._buf, (THINK_END,))
                reasoning.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            else:
                content.append(self._buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)
