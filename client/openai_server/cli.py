"""dsv4-openai: an OpenAI-compatible HTTP API in front of a running dsv4 Triton server."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import secrets
import sys
from pathlib import Path

from .config import LOOPBACK, OpenAIServerConfig, read_api_keys

EPILOG = """examples:
  dsv4-openai                                        # Triton gRPC on 127.0.0.1:8001, API on 127.0.0.1:9000
  dsv4-openai --triton 10.0.0.7:8001 --api-key-file /etc/dsv4/openai-keys --host 0.0.0.0
  curl -s http://127.0.0.1:9000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "dsv4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'
Beyond loopback a key is required: given with --api-key / --api-key-file, or generated and printed.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv4-openai", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton", default="127.0.0.1:8001", help="the Triton server's gRPC address (default 127.0.0.1:8001)")
    p.add_argument("--triton-model", default="dsv4", help="the streaming ensemble to call (default dsv4)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    p.add_argument("--served-model-name", action="append", dest="model_names", metavar="NAME",
                   help="model name clients use (repeatable; the first is the default; default dsv4)")
    p.add_argument("--api-key", action="append", dest="api_keys", default=[], metavar="KEY",
                   help="accepted 'Authorization: Bearer' key (repeatable); visible in the process list, prefer --api-key-file")
    p.add_argument("--api-key-file", type=Path, help="file of accepted keys, one per line ('#' comments allowed)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="chat answer length when a request sets neither max_tokens nor max_completion_tokens (default 512)")
    p.add_argument("--thinking", action="store_true",
                   help="thinking mode unless a request says otherwise (chat_template_kwargs.thinking)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds one request may take in all (default: no limit)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds open requests get to finish (default 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> OpenAIServerConfig:
    keys = set(args.api_keys)
    if args.api_key_file is not None:
        keys |= read_api_keys(args.api_key_file)
    if not keys and args.host not in LOOPBACK:
        key = secrets.token_urlsafe(24)
        keys.add(key)
        print(f"dsv4-openai: listening beyond loopback; clients must send 'Authorization: Bearer {key}'", file=sys.stderr)
    return OpenAIServerConfig(
        triton_url=args.triton, triton_model=args.triton_model, model_names=tuple(args.model_names or ("dsv4",)),
        api_keys=frozenset(keys), default_max_tokens=args.default_max_tokens, thinking=args.thinking,
        request_timeout_s=args.request_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (OSError, ValueError) as exc:
        print(f"dsv4-openai: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"dsv4-openai: http://{args.host}:{args.port}/v1 -> Triton {config.triton_url} "
          f"(models {', '.join(config.model_names)}; {'API key required' if config.api_keys else 'no API key'})",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout,
                # the standard asyncio loop: the one the grpc.aio client is tested on here; httptools
                # (a dependency) parses HTTP in C, h11 is uvicorn's pure-Python parser for environments without it
                loop="asyncio", http="httptools" if importlib.util.find_spec("httptools") else "h11")
    return 0
