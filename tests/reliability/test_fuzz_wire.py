"""The fuzzer's own answer checks: a correct answer must pass them, whatever text it carries."""

from __future__ import annotations

import json

import pytest

from .fuzz_wire import Outcome, _check_success_body, check_http, sse_lines
from .fuzz_requests import HttpRequest


def _event(text: str, finish_reason: str) -> str:
    # Triton escapes control characters below U+0020 but writes U+0085 and U+2028 as they are
    return "data: " + json.dumps({"text_output": text, "finish_reason": finish_reason}, ensure_ascii=False) + "\n\n"


@pytest.mark.parametrize("odd", ["\x85", "\u2028", "\u2029", "\x1c\x1d\x1e", "\x0b\x0c"])
def test_a_stream_whose_text_holds_unicode_line_breaks_is_read_as_one_event_each(odd):
    body = _event(f"RE{odd}x", "") + _event("y", "length")
    assert len([line for line in sse_lines(body) if line.startswith("data:")]) == 2
    _check_success_body("/v2/models/dsv4/generate_stream", body)
    req = HttpRequest(path="/v2/models/dsv4/generate_stream", headers=(), body=b"{}", chunk_size=None, truncate_to=None)
    check_http(req, Outcome("http 200", body, 0.1))


def test_sse_lines_end_at_crlf_lf_and_cr_only():
    assert sse_lines("a\r\nb\nc\rd\x85e") == ["a", "b", "c", "d\x85e"]


def test_a_stream_that_ends_without_a_finish_reason_fails_the_check():
    with pytest.raises(AssertionError):
        _check_success_body("/v2/models/dsv4/generate_stream", _event("x", ""))
