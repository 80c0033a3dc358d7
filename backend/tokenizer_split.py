"""Long texts encoded in pieces on all cores, with the ids a single `encode` gives.

DeepSeek's pre-tokenizer (three regex splits, then byte-level) runs at about 370 KB of text a second
on one core: 33-44 ms for an 8K-token prompt, the largest host cost in front of its prefill.
`Tokenizer.encode_batch` runs pieces on Rust threads. A piece boundary must be a boundary the whole
text's pre-tokenization has anyway, so that BPE (which never merges across pre-tokens) sees the
same pre-tokens: we cut only before a space that is followed by a letter outside the CJK class of
the second split (which isolates those letters first, so a space before them ends a whitespace
run that `\\s+` takes whole: "  中" is one pre-token of two spaces, then 中). In the third split's
pattern no alternative can continue through such a space (letter runs, punctuation runs and
newline runs stop before it, and a whitespace run ending there fails `(?!\\S)` one character on, so
it ends before it); the space then starts the next pre-token, ` ?letters`, the same whether or not
the text is cut there; the digit split isolates only digits, never letters; and the only
lookahead, `(?!\\S)`, sees a space or the end of the piece, both "not \\S". Tokenizers whose
pre-tokenizer or added tokens differ from the one this reasoning covers are never cut
(`splittable`); tests/unit/test_tokenizer_split.py checks equality on generated texts.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer

PIECE_CHARS = 1024  # the shortest piece (~500 tokens): shorter ones cost more in hand-offs than they save
PIECES_PER_CORE = 2  # a few per core evens out pieces that encode at different speeds
MAX_PIECES = 64
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

_DEEPSEEK_SPLITS = [
    "\\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+"
    "[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]


def splittable(tokenizer: Tokenizer) -> bool:
    """True when cutting before ` <letter>` keeps this tokenizer's ids: DeepSeek's pre-tokenizer, no
    normalizer, padding or truncation (which would act on each piece), and no added token that
    contains a space, strips the whitespace beside it, or starts with a letter a cut may precede
    (added tokens are split out before pre-tokenization)."""
    spec = json.loads(tokenizer.to_str())
    normalizer = spec.get("normalizer")
    if normalizer is not None and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        return False
    if spec.get("padding") is not None or spec.get("truncation") is not None:
        return False
    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    splits = [s for s in steps if s.get("type") == "Split"]
    if ([s.get("pattern", {}).get("Regex") for s in splits] != _DEEPSEEK_SPLITS
            or any(s.get("behavior") != "Isolated" or s.get("invert") for s in splits)
            or len(steps) != len(splits) + 1 or steps[-1] != {"type": "ByteLevel", "add_prefix_space": False,
                                                                  "trim_offsets": True, "use_regex": False}):
        return False
    return not any(" " in t["content"] or t.get("lstrip") or t.get("rstrip") or _starts_pre_token(t["content"][:1])
                   for t in spec.get("added_tokens", []))


def _starts_pre_token(char: str) -> bool:
    """A letter the third split sees (\\p{L} is str.isalpha), not one the second split isolates."""
    return len(char) == 1 and char.isalpha() and not ("\u4e00" <= char <= "\u9fa5" or "\u3040" <= char <= "\u30ff")


def cut_points(text: str, pieces: int) -> list[int]:
    """Up to `pieces - 1` positions, near equal spacing, each a space followed by a letter that
    `_starts_pre_token`."""
    cuts, step = [], len(text) // pieces
    for k in range(1, pieces):
        at = max(k * step, cuts[-1] + 1 if cuts else 1)
        while True:
            at = text.find(" ", at)
            if at < 0 or at + 1 >= len(text):
                return cuts
            if _starts_pre_token(text[at + 1]):
                break
            at += 1
        cuts.append(at)
    return cuts


def encode_pieces(tokenizer: Tokenizer, text: str, cores: int = CORES) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False).ids`, in parallel pieces of at least
    PIECE_CHARS when the text has room for two (the caller has checked `splittable`)."""
    pieces = min(len(text) // PIECE_CHARS, PIECES_PER_CORE * cores, MAX_PIECES)
    if pieces < 2:
        return tokenizer.encode(text, add_special_tokens=False).ids
    cuts = cut_points(text, pieces)
    bounds = [0, *cuts, len(text)]
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return [i for enc in tokenizer.encode_batch(parts, add_special_tokens=False) for i in enc.ids]
