"""dsv4-health: a real one-token inference through the server, for liveness and readiness probes.

Triton 2.51 keeps `/v2/health/ready` at 200 when a backend stub has died, so a probe must run an
actual inference. Exit 0 when a token came back within the timeout, 1 otherwise (with the reason).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

EPILOG = """examples:
  dsv4-health                                   # HTTP on 127.0.0.1:8000
  dsv4-health --url http://10.0.0.7:8000 --timeout 5
  dsv4-health --openai-url http://127.0.0.1:9000   # and the OpenAI API in front of it answers
Kubernetes:
  livenessProbe:  {exec: {command: [dsv4-health, --timeout, "5"]}, periodSeconds: 10, failureThreshold: 3}
  readinessProbe: {exec: {command: [dsv4-health, --timeout, "5"]}, periodSeconds: 5}
"""


def probe(url: str, timeout: float, model: str = "dsv4") -> tuple[bool, str]:
    body = json.dumps({"text_input": "health", "max_tokens": 1, "temperature": 0.0, "exclude_input_in_output": True}).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/v2/models/{model}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"no answer within {timeout:.1f}s: {exc}"
    elapsed = time.monotonic() - start
    if answer.get("num_output_tokens") != 1:
        return False, f"unexpected answer: {answer}"
    return True, f"ok: one token in {elapsed * 1000:.0f} ms"


def probe_openai(url: str, timeout: float) -> tuple[bool, str]:
    """dsv4-openai's /health: it answers and reaches a ready Triton."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        return False, f"OpenAI API: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"OpenAI API: no answer within {timeout:.1f}s: {exc}"
    return True, "OpenAI API ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-health", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP endpoint")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before the probe fails (default 5)")
    parser.add_argument("--model", default="dsv4")
    parser.add_argument("--openai-url", default=None, help="also check dsv4-openai's /health at this URL")
    parser.add_argument("--quiet", action="store_true", help="print nothing when healthy")
    args = parser.parse_args(argv)
    ok, message = probe(args.url, args.timeout, args.model)
    if ok and args.openai_url:
        ok, openai_message = probe_openai(args.openai_url, args.timeout)
        message = f"{message}; {openai_message}"
    if not ok or not args.quiet:
        print(f"dsv4-health: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
