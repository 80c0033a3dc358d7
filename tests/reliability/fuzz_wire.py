"""Send one fuzzed request the way a hostile client would (raw HTTP/1.1 on a socket, a raw gRPC
stream) and say what came back; `check_*` raise AssertionError on answers that are bugs."""

from __future__ import annotations

import http.client
import json
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass

import grpc

from .fuzz_requests import GrpcRequest, HttpRequest

TIMEOUT_S = 120.0
FINISH_REASONS = ("stop", "length", "cancelled", "shutdown")


@dataclass(frozen=True)
class Outcome:
    code: str  # "http 400", "http closed", "grpc ok", "grpc stream error", "grpc RESOURCE_EXHAUSTED", ...
    detail: str  # the error message or the body
    seconds: float


def _wire(req: HttpRequest, host: str) -> tuple[bytes, bytes]:
    body = req.body if req.truncate_to is None else req.body[: req.truncate_to]
    lines = [f"POST {req.path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in req.headers]
    if req.chunk_size:
        lines.append("Transfer-Encoding: chunked")
        step = req.chunk_size
        body = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + step]), body[i:i + step]) for i in range(0, len(body), step))
        body += b"" if req.truncate_to is not None else b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(req.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body


def send_http(host: str, port: int, req: HttpRequest) -> Outcome:
    head, body = _wire(req, host)
    start = time.monotonic()
    sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
    try:
        sock.sendall(head)
        sock.sendall(body)
        if req.truncate_to is not None:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        return Outcome(f"http {resp.status}", data.decode(errors="replace"), time.monotonic() - start)
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.IncompleteRead) as exc:
        return Outcome("http closed" + (" (truncated)" if req.truncate_to is not None else ""), repr(exc),
                       time.monotonic() - start)
    finally:
        sock.close()


def check_http(req: HttpRequest, out: Outcome) -> None:
    assert out.code != "http closed", f"connection dropped without an answer: {out.detail}"
    if out.code == "http closed (truncated)":
        return
    status = int(out.code.split()[1])
    # 501: Triton's answer to /infer on a decoupled model
    assert status in (200, 400, 404, 405, 500, 501, 503), out
    if status == 200:
        _check_success_body(req.path, out.detail)
        return
    # generate_stream reports an error found before the first token as one event
    body = out.detail[5:].split("\n", 1)[0] if out.detail.startswith("data:") else out.detail
    message = _json(body).get("error")
    assert message, out
    # Triton's own JSON reader answers 500; a 500 that passed through our ensemble is our bug
    assert not (status == 500 and "in ensemble" in message), out
    assert "Failed to process the request" not in message and "Traceback" not in message, out


def sse_lines(text: str) -> list[str]:
    """An event stream's lines: SSE ends lines only with CRLF, LF or CR. str.splitlines would also
    cut at U+0085, U+2028 and the like, which JSON carries unescaped inside generated text."""
    return re.split(r"\r\n|\r|\n", text)


def _json(what) -> dict:
    text = what.detail if isinstance(what, Outcome) else what
    try:
        return json.loads(text or "{}")
    except ValueError:
        raise AssertionError(f"answer is not JSON: {what!r:.2000}") from None


def _check_success_body(path: str, text: str) -> None:
    if path.endswith("generate_stream"):
        events = [_json(line[5:]) for line in sse_lines(text) if line.startswith("data:")]
        assert events, text
        assert "error" in events[-1] or events[-1].get("finish_reason") in FINISH_REASONS, text
    elif path.endswith("generate"):
        answer = _json(text)
        if "error" in answer:  # `"stream": true` on /generate: Triton answers 200 with this error body
            assert "exactly 1 response" in answer["error"], answer
            return
        assert answer["finish_reason"] in FINISH_REASONS and isinstance(answer["text_output"], str), answer


class GrpcSender:
    """One channel; each request gets its own bidirectional stream."""

    def __init__(self, url: str):
        from tritonclient.grpc import service_pb2_grpc

        self.channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1),
                                                           ("grpc.max_receive_message_length", -1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def send(self, req: GrpcRequest) -> Outcome:
        done = threading.Event()

        def requests():
            yield req.message
            done.wait(TIMEOUT_S)  # keep the stream open until the answer is read, then half-close

        start = time.monotonic()
        call = self.stub.ModelStreamInfer(requests(), timeout=TIMEOUT_S)
        try:
            if req.abandon:
                call.cancel()
            return self._read(call, start)
        finally:
            done.set()

    @staticmethod
    def _read(call, start: float) -> Outcome:
        answers: queue.Queue = queue.Queue()
        try:
            for response in call:
                if response.error_message:
                    return Outcome("grpc stream error", response.error_message, time.monotonic() - start)
                answers.put(response)
                final = response.infer_response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return Outcome("grpc ok", f"{answers.qsize()} responses", time.monotonic() - start)
            return Outcome("grpc ended", f"{answers.qsize()} responses, no final flag", time.monotonic() - start)
        except grpc.RpcError as exc:
            return Outcome(f"grpc {exc.code().name}", str(exc.details()), time.monotonic() - start)


def check_grpc(req: GrpcRequest, out: Outcome) -> None:
    if req.abandon:
        assert out.code in ("grpc CANCELLED", "grpc ok", "grpc stream error"), out
        return
    assert out.code in ("grpc ok", "grpc stream error", "grpc RESOURCE_EXHAUSTED", "grpc INVALID_ARGUMENT"), out
    assert "Failed to process the request" not in out.detail and "Traceback" not in out.detail, out
