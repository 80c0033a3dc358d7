"""Measure TTFT and inter-token latency of one fixed run three ways and compare them.

    python scripts/compare_latency.py --grpc-url 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics \\
        --requests 20 --max-tokens 32

The run is a fixed, seeded sequence of greedy gRPC streaming requests (built by the load-test
scenario code, so Locust's first user sends exactly the same sequence), one at a time:

  (a) client: dsv4.client.GrpcClient sends the sequence and times each stream itself;
  (b) locust: a headless Locust run (1 user, load_tests/locustfile.py) sends the same sequence;
      its raw JSONL samples are read and summarised by load_tests.report;
  (c) server: the metrics port, sampled before and after (a): our decode histograms
      vllm:time_to_first_token_seconds / vllm:time_per_output_token_seconds /
      vllm:e2e_request_latency_seconds (sum and count deltas; they start at the tokenizer's
      arrival time, so they leave out the network and Triton's gRPC front end), and Triton's
      nv_inference_* counters (Triton 2.51 has no first-response histogram: TTFT is estimated as
      the tokenizer's plus prefill's mean request duration, ITL as the rest of the dsv4 ensemble's
      mean request duration spread over the output tokens after the first).

TTFT is send -> first chunk carrying tokens, ITL = (latency - TTFT) / (output tokens - 1), per
request, then averaged (genai-perf's definitions). The first --warmup requests of (a) and (b) are
sent but not counted. Exits 1 when the TTFT or ITL means of (a) and (b) differ by more than
--tolerance (relative to (a)), 2 on bad usage or a failed run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from statistics import fmean, median

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # load_tests is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from dsv4.client import ClientError, GenerationRequest, GenerationResult, GrpcClient  # noqa: E402
from load_tests import report  # noqa: E402
from load_tests.run import locust_command  # noqa: E402
from load_tests.samples import read_samples  # noqa: E402
from load_tests.scenario import Scenario, scenario_from_dict  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three prime numbers:",
    "Explain what a compiler does in simple words, for someone who has never programmed before.",
    "Translate to German: the weather is nice today.",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "def fibonacci(n):",
    "Summarise: Triton serves models over HTTP and gRPC, batches requests and reports metrics.",
)
LOCUST_SEED = 1_000_003  # the locustfile seeds user k with scenario.seed * LOCUST_SEED + k
_LINE = re.compile(r'^(?P<name>[^\s{]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


def fixed_scenario(max_tokens: int, seed: int) -> dict:
    return {
        "name": "compare_latency",
        "description": "fixed greedy requests for scripts/compare_latency.py",
        "seed": seed,
        "timeout_s": 300,
        "sampling": {"temperature": 0.0},
        "requests": [{"name": "fixed", "max_tokens": max_tokens, "prompt": {"kind": "list", "texts": list(PROMPTS)}}],
        "pacing": {"kind": "closed", "think_time_s": 0.0},
    }


def request_sequence(scenario: Scenario, count: int) -> list[GenerationRequest]:
    """The first ``count`` requests Locust's first user sends for ``scenario``."""
    rng = random.Random(scenario.seed * LOCUST_SEED + 0)
    out = []
    for serial in range(count):
        spec = scenario.pick(rng)
        out.append(scenario.build_request(spec, rng, serial))
        scenario.cancel_after(rng)
    return out


# --- metrics port -------------------------------------------------------------------------


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric name -> [(labels, value)] from a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _LINE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            out[m["name"]].append((labels, float(m["value"])))
    return out


def total(snapshot: dict, name: str, **labels: str) -> float:
    return sum(v for lab, v in snapshot.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def wait_for_count(url: str, before: dict, name: str, count: int, timeout_s: float = 10.0) -> dict:
    """Scrape until ``name`` grew by at least ``count`` and then held still for 0.3 s (decode publishes its
    histograms every 0.1 s, so a snapshot taken too early would move a request into the next window)."""
    end = time.monotonic() + timeout_s
    last = None
    while True:
        snap = scrape(url)
        value = total(snap, name)
        if value - total(before, name) >= count and value == last or time.monotonic() > end:
            return snap
        last = value if value - total(before, name) >= count else None
        time.sleep(0.3)


def server_figures(before: dict, after: dict) -> dict[str, float | None]:
    """Means in ms over the window between two snapshots."""

    def hist_mean(name: str) -> float | None:
        count = delta(before, after, f"{name}_count")
        return None if count <= 0 else delta(before, after, f"{name}_sum") / count * 1e3

    def nv_mean(model: str) -> float | None:
        count = delta(before, after, "nv_inference_request_success", model=model)
        if count <= 0:
            return None
        return delta(before, after, "nv_inference_request_duration_us", model=model) / count / 1e3

    tokenizer, prefill, e2e = nv_mean("tokenizer"), nv_mean("prefill"), nv_mean("dsv4")
    nv_ttft = None if tokenizer is None or prefill is None else tokenizer + prefill
    requests = delta(before, after, "nv_inference_request_success", model="dsv4")
    mean_tokens = delta(before, after, "vllm:generation_tokens_total") / requests if requests else 0.0
    nv_itl = None
    if nv_ttft is not None and e2e is not None and mean_tokens > 1:
        nv_itl = (e2e - nv_ttft) / (mean_tokens - 1)
    count = delta(before, after, "nv_inference_request_success", model="prefill")
    queue = delta(before, after, "nv_inference_queue_duration_us", model="prefill") / count / 1e3 if count else None
    return {
        "vllm_ttft": hist_mean("vllm:time_to_first_token_seconds"),
        "vllm_itl": hist_mean("vllm:time_per_output_token_seconds"),
        "vllm_e2e": hist_mean("vllm:e2e_request_latency_seconds"),
        "nv_ttft": nv_ttft,
        "nv_itl": nv_itl,
        "nv_e2e": e2e,
        "nv_prefill_queue": queue,
        "nv_requests": requests,
        "vllm_requests": delta(before, after, "vllm:time_to_first_token_seconds_count"),
    }


# --- the three measurements ---------------------------------------------------------------


def run_client(grpc_url: str, model: str, requests: list[GenerationRequest]) -> list[GenerationResult]:
    with GrpcClient(grpc_url, model=model) as client:
        return [client.generate(r) for r in requests]


def run_locust(grpc_url: str, model: str, scenario_path: Path, out: Path, needed: int, duration_s: int) -> list[dict]:
    raw = out / "locust.jsonl"
    raw.unlink(missing_ok=True)
    cmd = locust_command(host=f"grpc://{grpc_url}", scenario=str(scenario_path), users=1, spawn_rate=1,
                         duration=f"{duration_s}s", raw_out=raw, csv_prefix=out / "locust", run_id="compare",
                         model=model, extra=["--loglevel", "WARNING"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=duration_s + 120)
    if result.returncode != 0 or not raw.exists():
        raise RuntimeError(f"locust failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    samples = sorted(read_samples([raw]), key=lambda s: s["t0"])
    if len(samples) < needed:
        raise RuntimeError(f"locust completed {len(samples)} of {needed} requests in {duration_s} s")
    return samples[:needed]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else (b - a) / a


Row = tuple[str, float, float, float | None, float | None, float | None]


def print_table(rows: list[Row], out=sys.stdout) -> None:
    """Columns: (a), (b), the server during (a) by both sources, the server during (b), (b) vs (a)."""
    header = (f"{'mean, ms':<20} {'(a) client':>10} {'(b) locust':>10} {'(c) vllm:*':>10} {'(c) nv_*':>10} "
              f"{'| vllm:* (b)':>12} {'(b) vs (a)':>11}")
    out.write(header + "\n" + "-" * len(header) + "\n")
    for name, a, b, c_vllm, c_nv, c_b in rows:
        rel = _rel(a, b)
        out.write(f"{name:<20} {_fmt(a):>10} {_fmt(b):>10} {_fmt(c_vllm):>10} {_fmt(c_nv):>10} "
                  f"{'| ' + _fmt(c_b):>12} {'-' if rel is None else f'{rel * 100:+.1f}%':>11}\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_latency.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc-url", default="127.0.0.1:8001",
                   help="server gRPC address host:port (default 127.0.0.1:8001)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics",
                   help="Prometheus page of the server (default http://127.0.0.1:8002/metrics)")
    p.add_argument("--requests", type=int, default=20, metavar="N", help="requests counted per method (default 20)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (greedy; default 32)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted (default 2)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest accepted relative difference of the (a) and (b) means (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request sequence (default 0)")
    p.add_argument("--model", default="dsv4", help="streaming model name (default dsv4)")
    p.add_argument("--out", default=None, help="keep the Locust samples and the scenario here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="also print all figures as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.requests < 2 or args.max_tokens < 2 or args.warmup < 0 or args.tolerance <= 0:
        parser.error("--requests and --max-tokens must be >= 2, --warmup >= 0, --tolerance > 0")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="compare-latency-"))
    out.mkdir(parents=True, exist_ok=True)
    scenario_dict = fixed_scenario(args.max_tokens, args.seed)
    scenario_path = out / "compare_latency.json"
    scenario_path.write_text(json.dumps(scenario_dict, indent=2) + "\n")
    scenario = scenario_from_dict(scenario_dict)
    total_requests = args.warmup + args.requests
    sequence = request_sequence(scenario, total_requests)
    warm, counted = sequence[: args.warmup], sequence[args.warmup:]

    load_before = os.getloadavg()[0]
    try:
        # (a) and (c): the client library, with the metrics port sampled around the counted requests
        started = time.perf_counter()
        ttft_count = "vllm:time_to_first_token_seconds_count"
        initial = wait_for_count(args.metrics_url, scrape(args.metrics_url), ttft_count, 0)
        run_client(args.grpc_url, args.model, warm)
        before = wait_for_count(args.metrics_url, initial, ttft_count, len(warm))
        results = run_client(args.grpc_url, args.model, counted)
        after = wait_for_count(args.metrics_url, before, ttft_count, args.requests)
        client_s = time.perf_counter() - started
        # (b): the same sequence from Locust's first (and only) user
        duration = int(math.ceil(client_s * 1.5 + 5))
        before_b = scrape(args.metrics_url)
        samples = run_locust(args.grpc_url, args.model, scenario_path, out, total_requests, duration)
        after_b = wait_for_count(args.metrics_url, before_b, ttft_count, len(samples))
        samples = samples[args.warmup:]
    except (ClientError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"compare_latency: {e}", file=sys.stderr)
        return 2

    bad = [r for r in results if r.finish_reason not in ("length", "stop") or r.ttft_s is None]
    failed = [s for s in samples if s["status"] != "ok"]
    if bad or failed:
        print(f"compare_latency: {len(bad)} client and {len(failed)} Locust requests did not complete", file=sys.stderr)
        return 2
    same = [r.num_input_tokens for r in results] == [s["num_input_tokens"] for s in samples]
    if not same or [r.num_output_tokens for r in results] != [s["num_output_tokens"] for s in samples]:
        print("compare_latency: Locust did not send the same requests as the client (token counts differ)",
              file=sys.stderr)
        return 2

    with open(out / "client.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({"ttft_s": r.ttft_s, "total_s": r.total_s, "itl_s": r.itl_s,
                                "num_input_tokens": r.num_input_tokens,
                                "num_output_tokens": r.num_output_tokens}) + "\n")
    pairs = list(zip([report.request_metrics(s) for s in samples], results, strict=True))
    paired_ttft = median(m["time_to_first_token_ms"] - r.ttft_s * 1e3 for m, r in pairs)
    paired_itl = median(m["inter_token_latency_ms"] - r.itl_s * 1e3 for m, r in pairs)
    output_tokens = sum(r.num_output_tokens for r in results)
    server = server_figures(before, after)
    server_b = server_figures(before_b, after_b)
    locust = report.run_metrics(samples)
    a_ttft = fmean(r.ttft_s for r in results) * 1e3
    a_itl = fmean(r.itl_s for r in results if r.itl_s is not None) * 1e3
    a_e2e = fmean(r.total_s for r in results) * 1e3
    rows = [
        ("TTFT", a_ttft, locust["time_to_first_token_ms"]["avg"], server["vllm_ttft"], server["nv_ttft"],
         server_b["vllm_ttft"]),
        ("inter-token latency", a_itl, locust["inter_token_latency_ms"]["avg"], server["vllm_itl"], server["nv_itl"],
         server_b["vllm_itl"]),
        ("request latency", a_e2e, locust["request_latency_ms"]["avg"], server["vllm_e2e"], server["nv_e2e"],
         server_b["vllm_e2e"]),
    ]
    print(f"{args.requests} requests (+{args.warmup} warm-up), {args.max_tokens} max tokens, greedy, sequential; "
          f"{output_tokens} output tokens; server {args.grpc_url}; load average {load_before:.2f} -> "
          f"{os.getloadavg()[0]:.2f} (other work on the machine skews every column)")
    print_table(rows)
    print(f"(b) - (a), median over the {args.requests} request pairs: TTFT {paired_ttft:+.2f} ms, "
          f"ITL {paired_itl:+.3f} ms")
    if server["vllm_requests"] != args.requests or server["nv_requests"] != args.requests:
        print(f"warning: the server counted {server['vllm_requests']:.0f} (vllm:*) and {server['nv_requests']:.0f} "
              f"(nv_*) requests during (a), not {args.requests}: someone else is using it", file=sys.stderr)
    print(f"(c) during (a), {server['nv_requests']:.0f} requests: vllm:* = decode's histograms (tokenizer arrival -> "
          f"token); nv_* = TTFT as tokenizer + prefill request duration, ITL as (dsv4 duration - that) / (tokens - 1); "
          f"prefill queue {_fmt(server['nv_prefill_queue'])} ms.\n"
          f"vllm:* (b): the same histograms over the whole Locust run ({server_b['nv_requests']:.0f} requests, "
          f"warm-up and the requests after the counted ones included).")
    if args.json:
        print(json.dumps({"client": {"ttft_ms": a_ttft, "itl_ms": a_itl, "e2e_ms": a_e2e}, "locust": locust,
                          "server": server, "server_during_locust": server_b, "requests": args.requests,
                          "max_tokens": args.max_tokens, "paired_median_ms": {"ttft": paired_ttft, "itl": paired_itl}}))
    failures = [name for name, a, b, *_ in rows[:2] if abs(_rel(a, b) or 0.0) > args.tolerance]
    if failures:
        print(f"FAIL: {', '.join(failures)} of client and Locust differ by more than {args.tolerance:.0%}")
        return 1
    print(f"OK: TTFT and ITL of client and Locust agree within {args.tolerance:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
