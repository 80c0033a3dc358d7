"""The DeepSeek-V4 special-token strings the front end renders and parses, and one scanning helper.

Each marker is a single token of the DeepSeek vocabulary, but the text around it (tag names,
attributes) spans ordinary tokens, so parsers work on text and must hold back a tail that may
still grow into a marker.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"


def held_suffix_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:length]):
                best = length
                break
    return best
