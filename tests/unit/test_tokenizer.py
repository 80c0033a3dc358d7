from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.backend.tokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopMatcher,
    TextCodec,
    apply_chat_template,
    find_stop,
    load_tokenizer,
    tokenizer_files,
)

BOS, EOS, USER, ASSISTANT, THINK_END = 0, 1, 128803, 128804, 128822

TEXTS = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "chinese": "你好，世界！深度求索的模型会说中文。",
    "emoji": "🌍🚀 family: 👨\u200d👩\u200d👧 flag: 🇯🇵 skin: 👍🏽",
    "whitespace": "  leading\ttab\n\nblank  line \r\n trailing   ",
    "mixed": "def f(x):\n    return x**2  # 平方 ✓ café naïve 😀\n",
    "empty": "",
}

_HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.load()


@pytest.fixture(scope="module")
def fragment_ids(codec: TextCodec) -> list[int]:
    # tokens that decode to a broken character on their own: they carry part of a multi-byte UTF-8 sequence
    ids = {i for text in TEXTS.values() for i in codec.encode(text, add_bos=False)}
    ids |= set(range(100, 400))
    return sorted(i for i in ids if REPLACEMENT_CHAR in codec.decode([i]))


def test_ids_and_files(codec: TextCodec) -> None:
    assert (codec.bos_id, codec.eos_id, codec.vocab_size) == (BOS, EOS, 129280)
    assert all(path.is_file() for path in tokenizer_files())


def test_load_from_model_dir_or_fallback(tmp_path) -> None:
    assert load_tokenizer(tmp_path).get_vocab_size() == 129280
    for path in tokenizer_files():
        shutil.copy(path, tmp_path / path.name)
    codec = TextCodec.load(tmp_path)
    assert (codec.bos_id, codec.eos_id) == (BOS, EOS)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_round_trip(codec: TextCodec, text: str) -> None:
    ids = codec.encode(text)
    assert ids[0] == BOS and BOS not in ids[1:]
    assert codec.decode(ids[1:]) == text
    assert codec.decode(ids, skip_special_tokens=True) == text
    assert codec.decode(ids) == "<｜begin▁of▁sentence｜>" + text
    assert codec.encode(text, add_bos=False) == ids[1:]


def test_encode_does_not_double_bos(codec: TextCodec) -> None:
    assert codec.encode("<｜begin▁of▁sentence｜>hi") == codec.encode("hi")


def test_chat_template_text_and_ids(codec: TextCodec) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]},
    ]
    text = apply_chat_template(messages)
    assert text == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>How are you?<｜Assistant｜></think>"
    )
    ids = codec.encode_chat(messages)
    assert ids == codec.encode(text) == codec.encode(text, add_bos=False)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert ids[-2:] == [ASSISTANT, THINK_END]
    assert ids.count(USER) == 2 and ids.count(ASSISTANT) == 2 and ids.count(EOS) == 1
    assert codec.decode(ids) == text
    no_prompt = apply_chat_template(messages[:2], add_generation_prompt=False)
    assert no_prompt == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi"
    assert codec.encode(no_prompt)[-2] == USER


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "non-empty"),
        ("hi", "non-empty"),
        (["hi"], "messages[0] must be an object"),
        ([{"role": "tool", "content": "x"}], "messages[0].role = 'tool'"),
        ([{"content": "x"}], "messages[0].role = None"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], "only text parts"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1]: system"),
    ],
    ids=["empty", "not-list", "not-dict", "bad-role", "no-role", "no-content", "int-content", "image", "late-system"],
)
def test_chat_template_rejects(messages, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        apply_chat_template(messages)


def _stream(codec: TextCodec, ids: list[int], chunks: list[int], skip: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(codec, skip_special_tokens=skip)
    deltas, start = [], 0
    for size in chunks:
        deltas.append(detok.push(ids[start : start + size]))
        start += size
    while start < len(ids):
        deltas.append(detok.push(ids[start]))
        start += 1
    deltas.append(detok.flush())
    return deltas


def _assert_stream_matches(codec: TextCodec, ids: list[int], deltas: list[str], skip: bool = False) -> None:
    full = codec.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    emitted = ""
    for delta in deltas:
        emitted += delta
        # every emitted prefix is final, so no transient U+FFFD ever reaches a client
        assert full.startswith(emitted)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_detokenizer_one_token_at_a_time(codec: TextCodec, text: str) -> None:
    ids = codec.encode(text, add_bos=False)
    deltas = _stream(codec, ids, [])
    _assert_stream_matches(codec, ids, deltas)
    assert REPLACEMENT_CHAR not in "".join(deltas)


def test_detokenizer_falls_back_to_whole_decodes_when_the_stream_gives_up(codec: TextCodec) -> None:
    """A decoder DecodeStream cannot follow makes `step` raise: that request goes on with whole
    decodes, and its text is still the full decode."""

    class GivesUp:
        def __init__(self, real, after):
            self.real, self.left = real, after

        def step(self, tokenizer, token_id):
            self.left -= 1
            if self.left < 0:
                raise Exception("InvalidPrefix")
            return self.real.step(tokenizer, token_id)

    ids = codec.encode(TEXTS["mixed"] * 3, add_bos=False)
    for after in (0, 5, len(ids) // 2):
        detok = IncrementalDetokenizer(codec)
        detok._stream = GivesUp(detok._stream, after)
        deltas = [detok.push(token_id) for token_id in ids] + [detok.flush()]
        _assert_stream_matches(codec, ids, deltas)


def test_detokenizer_holds_only_an_unfinished_character(codec: TextCodec) -> None:
    ids = codec.encode(TEXTS["mixed"] * 50, add_bos=False)
    detok = IncrementalDetokenizer(codec)
    widest = 0
    for token_id in ids:
        detok.push(token_id)
        widest = max(widest, len(detok.held_ids))
    assert 0 < widest <= 4  # a CJK character split over byte tokens is held, nothing more


@_HYPO
@given(data=st.data(), skip=st.booleans())
def test_detokenizer_random_ids(codec: TextCodec, fragment_ids: list[int], data, skip: bool) -> None:
    token = st.one_of(
        st.integers(0, codec.vocab_size - 1),
        st.sampled_from(fragment_ids),
        st.sampled_from([BOS, EOS, USER, ASSISTANT, THINK_END]),
    )
    ids = data.draw(st.lists(token, max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=10), label="chunks")
    _assert_stream_matches(codec, ids, _stream(codec, ids, chunks, skip), skip)


def test_stop_spanning_token_boundaries(codec: TextCodec) -> None:
    ids = codec.encode("Hello world, and 世界 again", add_bos=False)
    detok, matcher = IncrementalDetokenizer(codec), StopMatcher(["lo wor", "界 ag"])
    emitted = []
    for token_id in ids:
        result = matcher.push(detok.push(token_id))
        emitted.append(result.text)
        if result.stopped:
            break
    assert "".join(emitted) == "Hel"
    assert matcher.stopped and matcher.stop_string == "lo wor" and matcher.stop_position == 3
    assert matcher.push("more") == ("", True)


def test_stop_holds_back_then_releases() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.push("xa") == ("x", False)
    assert matcher.push("b") == ("", False)
    assert matcher.push("d") == ("abd", False)
    assert matcher.push("ab") == ("", False)
    assert matcher.flush() == "ab"


def test_stop_earliest_wins_within_one_delta() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.push("hello world") == ("hel", True)
    assert matcher.stop_string == "lo"
    assert find_stop("hello world", ["world", "o w"]) == (4, "o w")


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher()
    assert matcher.push("abc") == ("abc", False) and matcher.flush() == ""


def test_empty_stop_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_matcher_streams_like_batch(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    # generation halts at the first delivery point where a stop string has completed; the text is
    # cut where the earliest stop string starts in what was delivered by then (with overlapping
    # stop strings, a longer one that would complete later never gets the chance)
    match = next((m for b in bounds[1:] if (m := find_stop(text[:b], stops)) is not None), None)
    expected = text if match is None else text[: match[0]]
    matcher, emitted = StopMatcher(stops), ""
    for start, stop in zip(bounds, bounds[1:]):
        result = matcher.push(text[start:stop])
        emitted += result.text
        assert expected.startswith(emitted)
        assert find_stop(emitted, stops) is None
        if result.stopped:
            break
    if not matcher.stopped:
        emitted += matcher.flush()
    assert emitted == expected
    assert matcher.stopped == (match is not None)
    assert matcher.stop_position == (None if match is None else match[0])
