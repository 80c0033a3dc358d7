"""Soak test (`make soak`, not part of the CI suite): Locust at saturation against the tiny model.

Starts dsv4-serve on free loopback ports, warms up, then loads it for SOAK_MINUTES (default 10)
while sampling the resident memory of tritonserver and every backend stub. Passes when Locust
saw zero failures, no process grew more than 5% after warm-up, and the KV cache is back to zero
when the load stops. Writes `runs/soak/result.json` and prints a table for docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dsv4.scripts.triton_launcher import free_ports

GROWTH_LIMIT = 0.05


def _rss_by_process(workdir: Path) -> dict[str, int]:
    """Resident KiB of tritonserver and each stub started from `workdir` (keyed by role)."""
    out = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True).stdout
    rss = {}
    for line in out.splitlines():
        pid, cmd = line.split(" ", 1)
        if "pgrep" in cmd:
            continue
        if "tritonserver --model-repository" in cmd:
            role = "tritonserver"
        elif "triton_python_backend_stub" in cmd:
            role = cmd.split("/models/")[1].split("/")[0] + ":" + cmd.split()[-2]
        else:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss[role] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    return rss


def _median_rss(samples: list[dict]) -> dict[str, float]:
    roles = set.intersection(*(set(s["rss_kib"]) for s in samples))
    return {role: statistics.median(s["rss_kib"][role] for s in samples) for role in roles}


def _metric_sum(url: str, prefix: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _locust(host: str, users: int, seconds: int, raw: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "locust", "-f", "load_tests/locustfile.py", "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", host, "--scenario", "mixed", "--raw-out", str(raw), "--only-summary",
           "--csv", str(raw.with_suffix(""))]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    parser.add_argument("--warmup-s", type=int, default=180, help="load before memory is compared (caches and pools fill)")
    parser.add_argument("--users", type=int, default=16, help="concurrent streams (saturates 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics = free_ports(3)
    work = args.out / "server"
    serve = subprocess.Popen([sys.executable, "-m", "dsv4.scripts.serve", "--http-port", str(http), "--grpc-port", str(grpc),
                              "--metrics-port", str(metrics), "--workdir", str(work)],
                             stdout=open(args.out / "serve.log", "w"), stderr=subprocess.STDOUT)
    metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    try:
        while "is ready" not in (args.out / "serve.log").read_text():
            if serve.poll() is not None:
                print((args.out / "serve.log").read_text())
                return 1
            time.sleep(1)
        host = f"grpc://127.0.0.1:{grpc}"
        duration = int(args.warmup_s + args.minutes * 60)
        locust = _locust(host, args.users, duration, args.out / "raw.jsonl", args.out / "locust.log")
        samples = []
        start = time.monotonic()
        while locust.poll() is None:
            samples.append({"t": round(time.monotonic() - start, 1), "rss_kib": _rss_by_process(work)})
            time.sleep(15)
        # Locust drops its users' streams when time is up; decode finishes them, then must hold nothing
        deadline = time.monotonic() + 300
        running = 1.0
        while running and time.monotonic() < deadline:
            time.sleep(2)
            running = _metric_sum(metrics_url, "vllm:num_requests_running") + _metric_sum(metrics_url, "vllm:num_requests_waiting")
        time.sleep(1)
        after = _rss_by_process(work)
        kv_used = _metric_sum(metrics_url, "dsv4_kv_blocks_used{")
    finally:
        serve.terminate()
        serve.wait(90)
    stats = (args.out / "raw_stats.csv").read_text().splitlines()
    header = stats[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in stats[1:]]
    aggregated = next(r for r in rows if r.get("Name") == "Aggregated")
    failures, requests = int(aggregated["Failure Count"]), int(aggregated["Request Count"])
    # a minute of samples on each side: long prompts make transient peaks, a leak moves the median
    warm = _median_rss([s for s in samples if args.warmup_s <= s["t"] < args.warmup_s + 60])
    last = _median_rss([s for s in samples if s["t"] >= samples[-1]["t"] - 60])
    growth = {role: (last[role] - warm[role]) / warm[role] for role in warm if role in last}
    result = {"minutes": args.minutes, "users": args.users, "requests": requests, "failures": failures,
              "kv_blocks_used_after": kv_used, "requests_held_after": running, "rss_growth": growth,
              "rss_kib_warm": warm, "rss_kib_end": last, "rss_kib_idle_after": after, "samples": samples}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"soak: {args.minutes:g} min at {args.users} streams: {requests} requests, {failures} failures, "
          f"KV blocks in use afterwards {kv_used:g}, requests held {running:g}")
    print("| process | RSS, minute after warm-up (MiB, median) | RSS, last minute (MiB, median) | growth |\n|---|---|---|---|")
    for role in sorted(growth):
        print(f"| {role} | {warm[role] / 1024:.0f} | {last[role] / 1024:.0f} | {growth[role] * 100:+.1f}% |")
    ok = failures == 0 and kv_used == 0 and running == 0 and all(g < GROWTH_LIMIT for g in growth.values())
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
