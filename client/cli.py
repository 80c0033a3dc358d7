"""``dsv4-client``: send one prompt, or chat, to a dsv4 Triton server over gRPC or HTTP."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from .retry import RetryingTransport, RetryPolicy
from .transport import Endpoint, ResultBuilder, Transport, parse_url
from .types import ChatMessage, ClientError, ConnectionFailed, GenerationRequest, GenerationResult, Timeout

__all__ = ["main", "build_parser", "make_transport", "EXIT_OK", "EXIT_USAGE", "EXIT_REJECTED", "EXIT_CONNECTION"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_CONNECTION = 4
EXIT_INTERRUPTED = 130

TransportFactory = Callable[[Endpoint, argparse.Namespace], Transport]

_EPILOG = """\
examples:
  dsv4-client --prompt "Write a haiku about GPUs" --max-tokens 64 --stream
  dsv4-client --url http://127.0.0.1:8000 --prompt "Hello" --json
  dsv4-client --url grpc://10.0.0.5:8001 --prompt "2+2=" --temperature 0 --max-tokens 8
  dsv4-client --prompt "List three colours" --stop "\\n\\n" --seed 7 --top-p 0.9
  echo "Summarise: ..." | dsv4-client --prompt - --max-tokens 128
  dsv4-client chat --system "You are terse." --max-tokens 256

chat mode: type a message and press Enter; Ctrl-C stops the answer being written,
/reset clears the history, /exit or Ctrl-D quits; an unreachable server ends it (exit 4).

exit codes: 0 ok, 2 bad usage, 3 the server rejected the request (its message goes
to stderr), 4 the server could not be reached or did not answer in time, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4-client",
        description="Generate text with a dsv4 model served by Triton (gRPC streaming or HTTP generate).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", nargs="?", choices=("generate", "chat"), default="generate",
                   help="generate (default): one prompt; chat: interactive conversation")
    p.add_argument("--url", default=None,
                   help="server address: host:port, grpc://host:port or http://host:port "
                        "(default 127.0.0.1:8001 for grpc, http://127.0.0.1:8000 for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default=None,
                   help="transport (default: from the URL scheme, else grpc)")
    p.add_argument("--model", default="dsv4", help="model name (default dsv4)")
    p.add_argument("--unary-model", default="dsv4_unary",
                   help="non-decoupled model used by --unary over gRPC (default dsv4_unary)")
    p.add_argument("--prompt", help="the prompt; '-' reads it from stdin")
    p.add_argument("--chat", action="store_true", help="same as the chat command")
    p.add_argument("--system", help="system message for chat mode")
    p.add_argument("--max-tokens", type=int, help="maximum new tokens")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable); escapes like \\n are understood")
    p.add_argument("--stream", action="store_true", help="print text as tokens arrive")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, finish_reason, ttft_s, total_s, "
                        "num_input_tokens, num_output_tokens")
    p.add_argument("--unary", action="store_true",
                   help="one non-streaming call (gRPC unary infer / HTTP generate) instead of a stream")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="client-side deadline per request")
    p.add_argument("--retries", type=int, default=2,
                   help="retries when the server is UNAVAILABLE, before any token arrived (default 2)")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")
    return p


def make_transport(endpoint: Endpoint, args: argparse.Namespace) -> Transport:
    """The real transport for ``endpoint`` (imports the protocol's library only when needed)."""
    if endpoint.protocol == "http":
        from .http_client import HttpClient

        return HttpClient(endpoint.address, model=args.model, timeout_s=args.timeout)
    from .grpc_client import GrpcClient

    return GrpcClient(endpoint.address, model=args.model, unary_model=args.unary_model, timeout_s=args.timeout)


def _unescape(text: str) -> str:
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return text


def _request(args: argparse.Namespace, *, prompt: str | None = None,
             messages: list[ChatMessage] | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        messages=tuple(messages) if messages is not None else None,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(_unescape(s) for s in args.stop),
        timeout_s=args.timeout,
    )


def _run_stream(transport: Transport, request: GenerationRequest, out: TextIO | None) -> GenerationResult:
    """Stream ``request``, echoing text to ``out`` as it arrives; Ctrl-C cancels and re-raises."""
    sent_s = time.perf_counter()
    stream = transport.stream(request)
    builder = ResultBuilder(sent_s)
    try:
        for chunk in stream:
            builder.add(chunk)
            if out is not None and chunk.text:
                out.write(chunk.text)
                out.flush()
    except KeyboardInterrupt:
        stream.cancel()
        raise
    return builder.build()


def _report_error(e: ClientError, err: TextIO) -> int:
    if isinstance(e, ConnectionFailed | Timeout):
        err.write(f"dsv4-client: {e.message}\n")
        return EXIT_CONNECTION
    err.write(f"dsv4-client: server rejected the request ({e.code}): {e.message}\n")
    return EXIT_REJECTED


def _timing(result: GenerationResult, err: TextIO) -> None:
    ttft = "-" if result.ttft_s is None else f"{result.ttft_s * 1e3:.1f} ms"
    err.write(f"[finish={result.finish_reason or '-'} in={result.num_input_tokens} out={result.num_output_tokens} "
              f"ttft={ttft} total={result.total_s * 1e3:.1f} ms]\n")


def _generate(args: argparse.Namespace, transport: Transport, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    prompt = stdin.read() if args.prompt == "-" else args.prompt
    request = _request(args, prompt=prompt)
    try:
        if args.unary:
            result = transport.infer(request)
            if not args.json:
                out.write(result.text)
        else:
            result = _run_stream(transport, request, out if args.stream and not args.json else None)
            if not args.json and not args.stream:
                out.write(result.text)
    except ClientError as e:
        if args.stream and not args.json:
            out.write("\n")
        return _report_error(e, err)
    if args.json:
        out.write(json.dumps(result.to_json_dict(), ensure_ascii=False) + "\n")
    else:
        out.write("\n")
    out.flush()
    if args.verbose:
        _timing(result, err)
    return EXIT_OK


def _read_line(stdin: TextIO, err: TextIO) -> str | None:
    if stdin.isatty():
        try:
            return input("you> ")
        except EOFError:
            return None
    err.write("you> ")
    err.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _chat(args: argparse.Namespace, transport: Transport, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    history: list[ChatMessage] = [ChatMessage("system", args.system)] if args.system else []
    err.write("chat: /exit or Ctrl-D quits, /reset clears the history, Ctrl-C stops an answer\n")
    while True:
        try:
            line = _read_line(stdin, err)
        except KeyboardInterrupt:
            err.write("\n(use /exit or Ctrl-D to quit)\n")
            continue
        if line is None or line.strip() in ("/exit", "/quit"):
            if line is None:
                err.write("\n")
            return EXIT_OK
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            err.write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        turn = [*history, ChatMessage("user", line)]
        try:
            result = _run_stream(transport, _request(args, messages=turn), out)
        except KeyboardInterrupt:
            out.write("\n")
            err.write("(answer cancelled; this turn is not kept)\n")
            continue
        except ClientError as e:
            out.write("\n")
            code = _report_error(e, err)
            if code == EXIT_CONNECTION:  # nobody to talk to: end as the other modes do
                return code
            continue
        out.write("\n")
        out.flush()
        if args.verbose:
            _timing(result, err)
        history = [*turn, ChatMessage("assistant", result.text)]


def main(
    argv: list[str] | None = None,
    *,
    transport_factory: TransportFactory | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the CLI and return its exit code. Tests inject ``transport_factory`` and streams."""
    stdin = stdin if stdin is not None else sys.stdin
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    chat = args.chat or args.command == "chat"

    def usage(message: str) -> int:
        parser.print_usage(err)
        err.write(f"dsv4-client: error: {message}\n")
        return EXIT_USAGE

    if not chat and args.prompt is None:
        return usage("--prompt is required (or use the chat command)")
    if chat and (args.json or args.unary):
        return usage("--json and --unary do not apply to chat mode")
    if args.timeout is not None and args.timeout <= 0:
        return usage("--timeout must be positive")
    if args.retries < 0:
        return usage("--retries must be >= 0")
    try:
        endpoint = parse_url(args.url, args.protocol)
    except ValueError as e:
        return usage(str(e))

    factory = transport_factory or make_transport
    try:
        transport: Transport = factory(endpoint, args)
    except ClientError as e:
        return _report_error(e, err)
    if args.retries:
        transport = RetryingTransport(transport, RetryPolicy(max_attempts=args.retries + 1))
    try:
        if chat:
            return _chat(args, transport, stdin, out, err)
        return _generate(args, transport, stdin, out, err)
    except KeyboardInterrupt:
        out.write("\n")
        err.write("dsv4-client: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        try:
            transport.close()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
