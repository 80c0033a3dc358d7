"""Fuzzing the real server in the spirit of Triton's L0_http_fuzz (`make fuzz`: 15 minutes; CI
runs a short round in test_fuzz.py).

Rounds of three hypothesis properties, HTTP generate / generate_stream bodies and gRPC stream
requests (fuzz_requests.py), each sent as a hostile client would (fuzz_wire.py), until the time
is up. Every answer must be a clear error or a correct result and the server must stay up;
afterwards no request and no KV block may be held and a normal request must give the tokens it
gave before the run. Writes runs/fuzz/result.json and prints the figures for docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from dsv4.scripts.triton_launcher import free_ports

from .fuzz_requests import MB, grpc_requests, http_requests
from .fuzz_wire import GrpcSender, check_grpc, check_http, send_http
from ..server.calls import grpc_stream, metric

NORMAL_PROMPT = "a normal request after fuzzing"


@dataclass
class Tally:
    """What one run sent and saw (mutable: filled in as the run goes)."""

    deadline: float
    tried: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    slowest_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # the first answer seen with each code

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def add(self, code: str, detail: str, seconds: float) -> None:
        self.tried += 1
        self.codes[code] += 1
        self.examples.setdefault(code, detail[:300])
        self.slowest_s = max(self.slowest_s, seconds)


class Target:
    """The server under test, reached on loopback; `alive` says whether tritonserver still runs."""

    def __init__(self, http_port: int, grpc_port: int, metrics_port: int, alive):
        self.http_port, self.grpc_port, self.alive = http_port, grpc_port, alive
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def check_alive(self) -> None:
        assert self.alive(), "tritonserver died"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/live", timeout=10) as resp:
            assert resp.status == 200


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def http_round(target: Target, tally: Tally, examples: int, cap: int) -> None:
    @_settings(examples)
    @given(req=http_requests(cap))
    def prop(req):
        if tally.out_of_time():
            return
        out = send_http("127.0.0.1", target.http_port, req)
        tally.add(out.code, out.detail, out.seconds)
        target.check_alive()
        check_http(req, out)

    prop()


def grpc_round(target: Target, tally: Tally, examples: int, cap: int) -> None:
    sender = GrpcSender(target.grpc_url)

    @_settings(examples)
    @given(req=grpc_requests(cap))
    def prop(req):
        if tally.out_of_time():
            return
        out = sender.send(req)
        tally.add(out.code, out.detail, out.seconds)
        target.check_alive()
        check_grpc(req, out)

    try:
        prop()
    finally:
        sender.close()


def normal_reply(target: Target) -> list[int]:
    reply = grpc_stream(target.grpc_url, NORMAL_PROMPT, max_tokens=8, temperature=0.0)
    assert reply.error is None and len(reply.ids) == 8, reply
    return reply.ids


def held(target: Target, settle_s: float = 60.0) -> dict[str, float]:
    """Requests and KV blocks still held once the server has had time to finish what it was sent."""
    end = time.monotonic() + settle_s
    while True:
        now = {name: metric(target.metrics_url, name) for name in
               ("vllm:num_requests_running", "vllm:num_requests_waiting", "nv_inference_pending_request_count",
                "dsv4_kv_blocks_used")}
        if not any(now.values()) or time.monotonic() > end:
            return now
        time.sleep(1)


def run(target: Target, seconds: float, cap: int, examples_per_round: int = 20) -> dict:
    """Fuzz for `seconds`; returns the figures. Stops at the first property that fails."""
    before = normal_reply(target)
    tally = Tally(deadline=time.monotonic() + seconds)
    started = time.monotonic()
    rounds = 0
    while not tally.out_of_time() and not tally.failures:
        for fuzz in (http_round, grpc_round):
            try:
                fuzz(target, tally, examples_per_round, cap)
            except Exception as exc:  # hypothesis has shrunk it: keep the smallest failing example
                tally.failures.append(f"{fuzz.__name__}: {exc!r}"[:4000])
                break
        rounds += 1
    crashed = not target.alive()
    after_held = {} if crashed else held(target)
    after = None if crashed else normal_reply(target)
    return {"seconds": round(time.monotonic() - started), "rounds": rounds, "requests": tally.tried,
            "codes": dict(sorted(tally.codes.items())), "slowest_s": round(tally.slowest_s, 1), "largest_field_bytes": cap,
            "crashes": int(crashed), "failures": tally.failures, "examples": tally.examples, "held_after": after_held,
            "normal_request_same_after": after == before}


def passed(result: dict) -> bool:
    return (not result["crashes"] and not result["failures"] and not any(result["held_after"].values())
            and result["normal_request_same_after"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("FUZZ_MINUTES", 15)))
    parser.add_argument("--largest-mb", type=int, default=100, help="largest single field a request carries")
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics = free_ports(3)
    log = args.out / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "dsv4.scripts.serve", "--http-port", str(http), "--grpc-port", str(grpc),
                              "--metrics-port", str(metrics), "--max-model-len", "2048", "--max-tokens-limit", "1024",
                              "--workdir", str(args.out / "server")], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        while "is ready" not in log.read_text():
            if serve.poll() is not None:
                print(log.read_text())
                return 1
            time.sleep(1)
        target = Target(http, grpc, metrics, alive=lambda: serve.poll() is None)
        result = run(target, args.minutes * 60, args.largest_mb * MB)
    finally:
        stop_started = time.monotonic()
        serve.terminate()
        code = serve.wait(120)
    result["serve_exit_code"], result["stop_s"] = code, round(time.monotonic() - stop_started, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = passed(result) and code == 0
    print("fuzz: PASS" if ok else "fuzz: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
