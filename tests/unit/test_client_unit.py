"""Unit tests of dsv4.client without a server: parsing, error mapping, retries, the CLI over an in-memory transport."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from dsv4.client import (
    ChatMessage,
    ClientError,
    ConnectionFailed,
    GenerationRequest,
    GrpcClient,
    HttpClient,
    InvalidArgument,
    ResultBuilder,
    RetryingTransport,
    RetryPolicy,
    ServerError,
    SSEParser,
    StreamChunk,
    Timeout,
    Unavailable,
    collect,
    parse_url,
    retry_call,
    retry_call_async,
)
from dsv4.client import cli
from dsv4.client.grpc_client import build_inputs
from dsv4.client.http_client import SSEEvent, chunk_from_event, error_from_body
from dsv4.client.transport import chunk_from_json, chunk_from_tensors
from dsv4.client.types import Cancelled, error_from_grpc_status, error_from_http_status, error_from_message

REPO = Path(__file__).resolve().parents[2]


# --- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, protocol, expected",
    [
        (None, None, ("grpc", "127.0.0.1", 8001, "127.0.0.1:8001")),
        (None, "http", ("http", "127.0.0.1", 8000, "http://127.0.0.1:8000")),
        ("grpc://10.1.2.3:9001", None, ("grpc", "10.1.2.3", 9001, "10.1.2.3:9001")),
        ("http://myhost:8080", None, ("http", "myhost", 8080, "http://myhost:8080")),
        ("http://myhost", None, ("http", "myhost", 8000, "http://myhost:8000")),
        ("https://myhost", None, ("http", "myhost", 443, "https://myhost:443")),
        ("localhost:7001", None, ("grpc", "localhost", 7001, "localhost:7001")),
        ("localhost:7000", "http", ("http", "localhost", 7000, "http://localhost:7000")),
        ("localhost", "grpc", ("grpc", "localhost", 8001, "localhost:8001")),
        ("[::1]:8001", None, ("grpc", "::1", 8001, "[::1]:8001")),
        ("GRPC://h:1", "grpc", ("grpc", "h", 1, "h:1")),
    ],
    ids=["default", "default-http", "grpc-scheme", "http-scheme", "http-default-port", "https", "bare",
         "bare-http", "bare-host", "ipv6", "upper-scheme"],
)
def test_parse_url(url, protocol, expected):
    ep = parse_url(url, protocol)
    assert (ep.protocol, ep.host, ep.port, ep.address) == expected


@pytest.mark.parametrize(
    "url, protocol",
    [("ftp://h:1", None), ("http://h:1", "grpc"), ("grpc://h:1", "http"), ("h:notaport", None),
     ("http://h:1/v2", None), ("://", None), ("h:1", "udp")],
    ids=["bad-scheme", "http-vs-grpc", "grpc-vs-http", "bad-port", "path", "empty", "bad-protocol"],
)
def test_parse_url_rejects(url, protocol):
    with pytest.raises(ValueError):
        parse_url(url, protocol)


# --- requests and tensors ---------------------------------------------------------------


def test_request_validation_and_values():
    with pytest.raises(ValueError):
        GenerationRequest()
    with pytest.raises(ValueError):
        GenerationRequest(prompt="a", messages=[ChatMessage("user", "b")])
    with pytest.raises(ValueError):
        GenerationRequest(prompt="a", timeout_s=0)
    r = GenerationRequest(prompt="hi", max_tokens=5, temperature=0.5, stop="END")
    assert r.stop == ("END",)
    values = r.input_values(stream=True)
    assert values == {"text_input": "hi", "stream": True, "max_tokens": 5, "temperature": 0.5,
                      "stop_words": ["END"], "exclude_input_in_output": True}
    chat = GenerationRequest(messages=[{"role": "user", "content": "héllo"}])
    assert chat.messages == (ChatMessage("user", "héllo"),)
    assert chat.apply_chat_template
    v = chat.input_values(stream=False)
    assert json.loads(v["text_input"]) == [{"role": "user", "content": "héllo"}]
    assert v["apply_chat_template"] is True and v["stream"] is False


def test_build_inputs_types_and_shapes():
    r = GenerationRequest(prompt="hé", max_tokens=3, temperature=0.1, top_p=0.9, top_k=5, seed=2**40,
                          stop=("a", "b"))
    inputs = {i.name(): i for i in build_inputs(r, stream=True)}
    expected = {"text_input": ("BYTES", [1]), "stream": ("BOOL", [1]), "max_tokens": ("INT32", [1]),
                "temperature": ("FP32", [1]), "top_p": ("FP32", [1]), "top_k": ("INT32", [1]),
                "seed": ("UINT64", [1]), "stop_words": ("BYTES", [2]), "exclude_input_in_output": ("BOOL", [1])}
    assert {n: (i.datatype(), i.shape()) for n, i in inputs.items()} == expected


def test_chunk_from_tensors():
    arrays = {
        "text_output": np.array([" wor".encode()], dtype=np.object_),
        "output_ids": np.array([7, 8], dtype=np.int32),
        "finish_reason": np.array([b""], dtype=np.object_),
        "num_input_tokens": np.array([4], dtype=np.int32),
        "num_output_tokens": np.array([2], dtype=np.int32),
    }
    chunk = chunk_from_tensors(arrays.get, 1.5)
    assert chunk == StreamChunk(" wor", (7, 8), 1.5, "", 4, 2)
    assert chunk_from_tensors({}.get, 1.0) is None


@pytest.mark.parametrize(
    "obj, text, ids, finish",
    [
        ({"text_output": "a", "output_ids": 5, "finish_reason": "", "num_output_tokens": 1}, "a", (5,), ""),
        ({"text_output": ["a", "b"], "output_ids": [5, 6], "finish_reason": ["stop"]}, "ab", (5, 6), "stop"),
        ({"text_output": "", "output_ids": [], "finish_reason": "length"}, "", (), "length"),
    ],
    ids=["scalars", "lists", "empty-final"],
)
def test_chunk_from_json(obj, text, ids, finish):
    chunk = chunk_from_json(obj, 0.0)
    assert (chunk.text, chunk.token_ids, chunk.finish_reason) == (text, ids, finish)
    assert chunk_from_json({"model_name": "dsv4"}, 0.0) is None


# --- SSE ---------------------------------------------------------------------------------

STREAM = (
    ': comment\r\n'
    'data: {"text_output":"he","output_ids":1}\r\n\r\n'
    'event: message\n'
    'data: {"text_output":"llo é",\n'
    'data: "output_ids":[2,3]}\n\n'
    'data: {"text_output":"!","output_ids":4,"finish_reason":"stop"}\r\r'
).encode("utf-8")


def _events(parser: SSEParser, pieces: list[bytes]) -> list[SSEEvent]:
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.close()


def test_sse_whole_stream():
    events = _events(SSEParser(), [STREAM])
    assert [json.loads(e.data)["output_ids"] for e in events] == [1, [2, 3], 4]
    assert json.loads(events[1].data)["text_output"] == "llo é"
    assert events[1].event == "message"


def test_sse_split_at_every_byte():
    whole = _events(SSEParser(), [STREAM])
    for cut in range(1, len(STREAM)):
        assert _events(SSEParser(), [STREAM[:cut], STREAM[cut:]]) == whole, cut
    assert _events(SSEParser(), [bytes([b]) for b in STREAM]) == whole


def test_sse_close_flushes_unterminated_event_and_strips_bom():
    parser = SSEParser()
    assert parser.feed('\ufeffdata: {"a":1}'.encode()) == []
    assert parser.close() == [SSEEvent('{"a":1}')]


def test_sse_error_events_raise_mapped_errors():
    with pytest.raises(ServerError, match="boom"):
        chunk_from_event(SSEEvent('{"error":"decode failed: boom"}'), 0.0)
    with pytest.raises(Unavailable):
        chunk_from_event(SSEEvent('{"error":"server is full, try again later"}'), 0.0)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        chunk_from_event(SSEEvent('{"error":"max_tokens must be >= 1"}'), 0.0)
    with pytest.raises(ServerError, match="malformed"):
        chunk_from_event(SSEEvent("not json"), 0.0)


@pytest.mark.parametrize(
    "status, body, cls, message",
    [
        (400, b'{"error":"top_p must be in (0, 1]"}', InvalidArgument, "top_p must be in (0, 1]"),
        (400, b'data: {"error":"server is full, try again later"}\n\n', Unavailable, "server is full, try again later"),
        (400, b'{"error":"something odd"}', InvalidArgument, "something odd"),
        (503, b'{"error":"Exceeds maximum queue size"}', Unavailable, "Exceeds maximum queue size"),
        (404, b'{"error":"Request for unknown model"}', ServerError, "Request for unknown model"),
        (500, b"plain text", ServerError, "plain text"),
    ],
    ids=["400-json", "400-sse-unavailable", "400-unclassified", "503", "404", "500-text"],
)
def test_error_from_body(status, body, cls, message):
    err = error_from_body(status, body)
    assert type(err) is cls and err.message == message and err.http_status == status


def test_error_classification():
    assert isinstance(error_from_grpc_status("StatusCode.INVALID_ARGUMENT", "x"), InvalidArgument)
    assert isinstance(error_from_grpc_status("StatusCode.CANCELLED", "x"), Cancelled)
    assert isinstance(error_from_grpc_status("StatusCode.DEADLINE_EXCEEDED", "x"), Timeout)
    down = error_from_grpc_status("StatusCode.UNAVAILABLE", "failed to connect to all addresses")
    assert type(down) is ConnectionFailed
    busy = error_from_grpc_status("StatusCode.UNAVAILABLE", "Exceeds maximum queue size")
    assert type(busy) is Unavailable
    internal = error_from_grpc_status("StatusCode.INTERNAL", "oops")
    assert type(internal) is ServerError and internal.code == "INTERNAL"
    assert isinstance(error_from_message("in ensemble 'dsv4', request was cancelled"), Cancelled)
    assert type(error_from_message("kernel exploded")) is ServerError
    assert type(error_from_http_status(503, "full")) is Unavailable


# --- results -----------------------------------------------------------------------------


def test_result_assembly_from_chunks():
    sent = 10.0
    chunks = [
        StreamChunk("", (), 10.05, "", 3, 0),  # empty first response does not count as first token
        StreamChunk("Hel", (1, 2), 10.2, "", 3, 2),
        StreamChunk("lo", (3,), 10.3, "", 3, 3),
        StreamChunk("!", (4,), 10.5, "length", 3, 4),
    ]
    r = collect(chunks, sent, "rid")
    assert r.text == "Hello!" and r.token_ids == (1, 2, 3, 4) and r.finish_reason == "length"
    assert r.num_input_tokens == 3 and r.num_output_tokens == 4 and r.request_id == "rid"
    assert r.ttft_s == pytest.approx(0.2) and r.total_s == pytest.approx(0.5)
    assert r.token_times_s == pytest.approx((0.2, 0.2, 0.3, 0.5))
    assert r.chunk_times_s == pytest.approx((0.05, 0.2, 0.3, 0.5))
    assert r.itl_s == pytest.approx((0.5 - 0.2) / 3)
    assert set(r.to_json_dict()) == {"text", "token_ids", "finish_reason", "ttft_s", "total_s",
                                     "num_input_tokens", "num_output_tokens"}


def test_result_counts_ids_without_server_counter_and_overrides():
    b = ResultBuilder(0.0)
    b.add(StreamChunk("a", (1,), 0.1))
    b.add(StreamChunk("b", (2,), 0.4))
    r = b.build(end_s=0.7, finish_reason="cancelled")
    assert r.num_output_tokens == 2 and r.finish_reason == "cancelled" and r.total_s == pytest.approx(0.7)
    single = collect([StreamChunk("a", (1,), 1.0, "stop", None, 1)], 0.5)
    assert single.itl_s is None and single.ttft_s == pytest.approx(0.5)


# --- retries -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "error, attempt, tokens, expected",
    [
        (Unavailable("full"), 1, False, True),
        (ConnectionFailed("down"), 2, False, True),
        (Unavailable("full"), 3, False, False),
        (Unavailable("full"), 1, True, False),
        (InvalidArgument("bad"), 1, False, False),
        (ServerError("x"), 1, False, False),
        (Timeout("slow"), 1, False, False),
        (ValueError("not a client error"), 1, False, False),
    ],
    ids=["unavailable", "connection", "attempts-spent", "after-tokens", "invalid-arg", "server-error",
         "timeout", "other"],
)
def test_retry_decisions(error, attempt, tokens, expected):
    assert RetryPolicy(max_attempts=3).should_retry(error, attempt, tokens_received=tokens) is expected


def test_backoff_timing_with_fake_clock():
    policy = RetryPolicy(max_attempts=6, initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5, jitter=0.5)
    clock = FakeClock()
    calls = []

    def always_full():
        calls.append(clock())
        raise Unavailable("full")

    with pytest.raises(Unavailable):
        retry_call(always_full, policy, sleep=clock.sleep, rand=lambda: 0.0, clock=clock)
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert calls == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.2, 1.7])
    # jitter scales each wait into [base * (1 - jitter), base]
    assert policy.backoff_s(3, 0.999999) == pytest.approx(0.4 * 0.5, rel=1e-5)
    # the elapsed budget stops retrying before a wait would cross it
    clock = FakeClock()
    budget = RetryPolicy(max_attempts=10, initial_backoff_s=1.0, multiplier=1.0, jitter=0.0, max_elapsed_s=2.5)
    with pytest.raises(Unavailable):
        retry_call(always_full, budget, sleep=clock.sleep, rand=lambda: 0.0, clock=clock)
    assert clock.sleeps == [1.0, 1.0]


def test_retry_call_succeeds_and_never_retries_invalid_arg():
    clock = FakeClock()
    outcomes = [Unavailable("full"), Unavailable("full"), "ok"]

    def flaky():
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    assert retry_call(flaky, RetryPolicy(), sleep=clock.sleep, rand=lambda: 0.0, clock=clock) == "ok"
    assert len(clock.sleeps) == 2
    clock = FakeClock()
    with pytest.raises(InvalidArgument):
        retry_call(lambda: (_ for _ in ()).throw(InvalidArgument("bad")), RetryPolicy(), sleep=clock.sleep)
    assert clock.sleeps == []


def test_retry_call_async():
    sleeps = []

    async def fake_sleep(s):
        sleeps.append(s)

    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise Unavailable("full")
        return 42

    result = asyncio.run(retry_call_async(flaky, RetryPolicy(initial_backoff_s=0.1, jitter=0.0), sleep=fake_sleep))
    assert result == 42 and sleeps == pytest.approx([0.1, 0.2])


class FakeStream:
    def __init__(self, chunks, error=None, interrupt_after=None):
        self.chunks = list(chunks)
        self.error = error
        self.interrupt_after = interrupt_after
        self.cancelled = False
        self.sent = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.cancelled:
            raise StopIteration
        if self.interrupt_after is not None and self.sent == self.interrupt_after:
            raise KeyboardInterrupt
        if self.chunks:
            self.sent += 1
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        raise StopIteration

    def cancel(self):
        self.cancelled = True


def _chunks(text="Hi there", finish="length"):
    words = text.split(" ")
    now = time.perf_counter()
    return [
        StreamChunk((" " if i else "") + w, (100 + i,), now + 0.01 * (i + 1), finish if i == len(words) - 1 else "",
                    5, i + 1)
        for i, w in enumerate(words)
    ]


class FakeTransport:
    """Plays scripted streams; records the requests it was given."""

    def __init__(self, streams=(), infer_result=None, infer_error=None):
        self.streams = list(streams)
        self.requests: list[GenerationRequest] = []
        self.infer_result = infer_result
        self.infer_error = infer_error
        self.closed = False

    def stream(self, request):
        self.requests.append(request)
        item = self.streams.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def infer(self, request):
        self.requests.append(request)
        if self.infer_error:
            raise self.infer_error
        return self.infer_result

    def close(self):
        self.closed = True


def test_retrying_transport_stream():
    clock = FakeClock()
    inner = FakeTransport([Unavailable("full"), FakeStream([], error=Unavailable("full")), FakeStream(_chunks())])
    t = RetryingTransport(inner, RetryPolicy(max_attempts=3), sleep=clock.sleep, rand=lambda: 0.0, clock=clock)
    stream = t.stream(GenerationRequest(prompt="x"))
    assert "".join(c.text for c in stream) == "Hi there"
    assert stream.attempts == 3 and len(clock.sleeps) == 2

    # once a token has arrived, a failure is final
    inner = FakeTransport([FakeStream(_chunks()[:1], error=Unavailable("full")), FakeStream(_chunks())])
    t = RetryingTransport(inner, RetryPolicy(max_attempts=3), sleep=clock.sleep, rand=lambda: 0.0, clock=clock)
    got = []
    with pytest.raises(Unavailable):
        for c in t.stream(GenerationRequest(prompt="x")):
            got.append(c)
    assert len(got) == 1 and len(inner.streams) == 1


# --- CLI ---------------------------------------------------------------------------------


def run_cli(argv, transport, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    seen = {}

    def factory(endpoint, args):
        seen["endpoint"] = endpoint
        seen["args"] = args
        return transport

    code = cli.main(argv, transport_factory=factory, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue(), seen


def test_cli_json_output_shape():
    t = FakeTransport([FakeStream(_chunks("Hello big world"))])
    code, out, err, seen = run_cli(
        ["--url", "http://h:9", "--prompt", "hi", "--json", "--max-tokens", "3", "--temperature", "0",
         "--top-p", "0.5", "--top-k", "4", "--seed", "7", "--stop", "\\n\\n", "--stop", "END", "--timeout", "9"], t)
    assert code == 0, err
    obj = json.loads(out)
    assert out.count("\n") == 1
    assert set(obj) == {"text", "token_ids", "finish_reason", "ttft_s", "total_s", "num_input_tokens",
                        "num_output_tokens"}
    assert obj["text"] == "Hello big world" and obj["token_ids"] == [100, 101, 102]
    assert obj["finish_reason"] == "length" and obj["num_output_tokens"] == 3 and obj["ttft_s"] >= 0
    assert seen["endpoint"].protocol == "http" and seen["endpoint"].address == "http://h:9"
    req = t.requests[0]
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.timeout_s) == (
        "hi", 3, 0.0, 0.5, 4, 7, 9.0)
    assert req.stop == ("\n\n", "END")
    assert t.closed


def test_cli_stream_plain_unary_and_stdin_prompt():
    code, out, _, seen = run_cli(["--prompt", "hi", "--stream"], FakeTransport([FakeStream(_chunks("a b"))]))
    assert code == 0 and out == "a b\n" and seen["endpoint"].protocol == "grpc"
    code, out, _, _ = run_cli(["--prompt", "-"], t := FakeTransport([FakeStream(_chunks("x y"))]), stdin="from stdin")
    assert code == 0 and out == "x y\n" and t.requests[0].prompt == "from stdin"
    result = collect(_chunks("u v"), time.perf_counter())
    code, out, _, _ = run_cli(["--prompt", "q", "--unary", "--json"], FakeTransport(infer_result=result))
    assert code == 0 and json.loads(out)["text"] == "u v"


@pytest.mark.parametrize(
    "argv",
    [[], ["--prompt", "x", "--url", "ftp://h"], ["--prompt", "x", "--url", "http://h:1", "--protocol", "grpc"],
     ["--prompt", "x", "--max-tokens", "many"], ["--prompt", "x", "--timeout", "0"], ["--bogus"],
     ["chat", "--json"]],
    ids=["no-prompt", "bad-scheme", "protocol-mismatch", "bad-int", "bad-timeout", "unknown-flag", "chat-json"],
)
def test_cli_usage_errors_exit_2(argv, capsys):
    code, _, _, seen = run_cli(argv, FakeTransport())
    assert code == cli.EXIT_USAGE and "endpoint" not in seen


def test_cli_help_exits_0(capsys):
    code, _, _, _ = run_cli(["--help"], FakeTransport())
    assert code == 0
    help_text = capsys.readouterr().out
    assert "dsv4-client --prompt" in help_text and "exit codes" in help_text


@pytest.mark.parametrize(
    "error, code",
    [(InvalidArgument("max_tokens must be >= 1"), 3), (Unavailable("server is full"), 3),
     (ServerError("internal failure"), 3), (ConnectionFailed("failed to connect"), 4), (Timeout("too slow"), 4)],
    ids=["invalid-arg", "unavailable", "server-error", "connection", "timeout"],
)
def test_cli_error_exit_codes(error, code):
    t = FakeTransport([error] * 3)
    rc, _, err, _ = run_cli(["--prompt", "x", "--retries", "0"], t)
    assert rc == code and error.message in err


def test_cli_mid_stream_error_after_tokens_is_not_retried():
    t = FakeTransport([FakeStream(_chunks("a b")[:1], error=ServerError("decode failed")), FakeStream(_chunks())])
    rc, out, err, _ = run_cli(["--prompt", "x", "--stream"], t)
    assert rc == 3 and out.startswith("a") and "decode failed" in err and len(t.streams) == 1


def test_cli_chat_keeps_history_and_survives_errors_and_ctrl_c():
    t = FakeTransport([
        FakeStream(_chunks("Hi!")),
        InvalidArgument("prompt too long"),
        FakeStream(_chunks("never finished answer"), interrupt_after=1),
        FakeStream(_chunks("Fine.")),
    ])
    stdin = "hello\n\ntoo long\nwrite forever\nhow are you\n/exit\nignored\n"
    code, out, err, _ = run_cli(["chat", "--system", "be brief", "--max-tokens", "8"], t, stdin=stdin)
    assert code == 0
    assert len(t.requests) == 4 and all(r.apply_chat_template for r in t.requests)
    last = [(m.role, m.content) for m in t.requests[-1].messages]
    # the failed and the cancelled turns are not kept
    assert last == [("system", "be brief"), ("user", "hello"), ("assistant", "Hi!"), ("user", "how are you")]
    assert "prompt too long" in err and "cancelled" in err
    assert t.streams == [] and "Fine." in out


def test_cli_chat_ends_on_eof():
    code, _, _, _ = run_cli(["--chat"], FakeTransport([FakeStream(_chunks("ok"))]), stdin="hi\n")
    assert code == 0


def test_connection_refused():
    with pytest.raises(ConnectionFailed):
        HttpClient("http://127.0.0.1:1", timeout_s=2).generate(GenerationRequest(prompt="x"))
    with GrpcClient("127.0.0.1:1") as client, pytest.raises(ConnectionFailed):
        client.generate(GenerationRequest(prompt="x"))


def test_errors_are_client_errors():
    for cls in (InvalidArgument, Unavailable, ConnectionFailed, Cancelled, Timeout, ServerError):
        assert issubclass(cls, ClientError)


def test_client_and_load_tests_do_not_import_the_backend():
    for folder in ("client", "load_tests"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert "dsv4.backend" not in text and "from backend" not in text and "import backend" not in text, path


def test_cli_chat_without_a_server_exits_4():
    from dsv4.client.cli import main

    err = io.StringIO()
    code = main(["chat", "--url", "127.0.0.1:1", "--retries", "0", "--timeout", "5"], stdin=io.StringIO("hello\nagain\n"),
                stdout=io.StringIO(), stderr=err)
    assert code == 4, err.getvalue()
