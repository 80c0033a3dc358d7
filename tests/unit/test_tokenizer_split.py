"""Long texts encoded in pieces give exactly the ids of one encode (backend/tokenizer_split.py)."""

import json

import pytest
from hypothesis import example, given, settings, strategies as st
from tokenizers import Tokenizer

from dsv4.backend import tokenizer_split
from dsv4.backend.tokenizer import BOS_TOKEN, USER_TOKEN, TextCodec, load_tokenizer

TOKENIZER = load_tokenizer()
# the characters the pre-tokenizer's splits tell apart: letters of several scripts, marks, digits
# (ASCII and others), punctuation, symbols, every kind of whitespace, CJK, emoji, special tokens
ATOMS = ["a", "Z", "é", "ß", "ж", "ω", "\u0301", "3", "٣", "½", ".", ",", "'", "-", "(", "$", "+", "€", " ", "  ",
         "\t", "\n", "\r\n", "\u00a0", "\u3000", "中", "文", "ひ", "カ", "한", "😀", "👍🏽", BOS_TOKEN, USER_TOKEN,
         "word", " word", "Hello", " the", "x1", "__", "http://a.b/c?d=1"]


def _ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), min_size=0, max_size=120))
@example(["  ", "中"])  # the CJK split isolates 中 first: the two spaces before it are one pre-token
@example(["a", "\t", " ", "カ", " ", "ひ"])
@example(["x", "  ", "é", " ", "\u0301", " ", "ж"])
def test_pieces_give_the_ids_of_one_encode(atoms):
    text = "".join(atoms)
    tokenizer_split.PIECE_CHARS, saved = 4, tokenizer_split.PIECE_CHARS  # many cuts even in short texts
    try:
        assert tokenizer_split.encode_pieces(TOKENIZER, text, cores=32) == _ids(text)
    finally:
        tokenizer_split.PIECE_CHARS = saved


def test_cuts_fall_before_a_space_followed_by_a_letter():
    text = "12 345 .. éa  b\tc\n d 中 e" * 50
    cuts = tokenizer_split.cut_points(text, 40)
    assert len(cuts) > 10 and cuts == sorted(set(cuts))
    assert all(text[c] == " " and text[c + 1].isalpha() and text[c + 1] != "中" for c in cuts)
    assert tokenizer_split.cut_points("no-spaces-at-all" * 10, 8) == []


def test_a_long_prompt_through_the_codec_matches_one_encode():
    codec = TextCodec.load()
    text = " ".join(f"word{i} naïve 東京 {i * 7919 % 1000}, (x)" for i in range(3000))  # ~90K characters
    assert len(text) > 8 * tokenizer_split.PIECE_CHARS and tokenizer_split.CORES >= 1
    assert codec.encode(text) == [codec.bos_id, *_ids(text)]


@pytest.mark.parametrize("change", ["normalizer", "regex", "added token strips", "added token with a space",
                                    "added token starting with a letter", "padding"])
def test_other_tokenizers_are_never_cut(change):
    spec = json.loads(TOKENIZER.to_str())
    assert tokenizer_split.splittable(TOKENIZER)
    if change == "normalizer":
        spec["normalizer"] = {"type": "NFKC"}
    elif change == "regex":
        spec["pre_tokenizer"]["pretokenizers"][2]["pattern"]["Regex"] = "\\s+|\\w+"
    elif change == "added token strips":
        spec["added_tokens"][0]["lstrip"] = True
    elif change == "added token with a space":
        spec["added_tokens"][0]["content"] = "<a b>"
    elif change == "added token starting with a letter":
        spec["added_tokens"][0]["content"] = "tok"
    else:
        spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}
    assert not tokenizer_split.splittable(Tokenizer.from_str(json.dumps(spec)))
