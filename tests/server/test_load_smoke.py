"""Load-test smoke against the real tritonserver: a short headless Locust run through
load_tests.run (report included), and a cancel-churn run after which the server holds nothing."""

from __future__ import annotations

import csv
import json
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .calls import metric

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # load_tests is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from load_tests import run as load_run  # noqa: E402
from load_tests.samples import read_samples  # noqa: E402

USERS = 4
_SAMPLE = re.compile(r'^(?P<name>[^\s{]+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')


def metric_samples(metrics_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every labelled sample of one metric family: (labels, value)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            out.append((labels, float(m["value"])))
    return out


class RunningMax:
    """Polls a gauge in the background and keeps its largest value."""

    def __init__(self, metrics_url: str, name: str, period_s: float = 0.1) -> None:
        self.metrics_url, self.name, self.period_s = metrics_url, name, period_s
        self.value = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.value = max(self.value, metric(self.metrics_url, self.name))
            except OSError:
                pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> RunningMax:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def max_overlap(samples: list[dict]) -> int:
    """The most requests that were in flight at one instant (send .. last response)."""
    edges = sorted([(s["t0"], 1) for s in samples] + [(s["t_last"], -1) for s in samples])
    level = best = 0
    for _, step in edges:
        level += step
        best = max(best, level)
    return best


def run_scenario(server, out: Path, scenario: str, duration: str) -> dict:
    code = load_run.main(["--scenario", scenario, "--host", f"grpc://{server.grpc_url}", "--users", str(USERS),
                          "--duration", duration, "--out", str(out)])
    assert code == 0
    return json.loads((out / "report" / "summary.json").read_text())


def wait_until_idle(metrics_url: str, timeout: float = 15.0) -> float:
    """Seconds until decode holds no request, running or waiting (fails after ``timeout``)."""
    start = time.monotonic()
    while (metric(metrics_url, "vllm:num_requests_running") or metric(metrics_url, "vllm:num_requests_waiting")):
        assert time.monotonic() - start < timeout, "the server still holds requests after the load stopped"
        time.sleep(0.1)
    waited = time.monotonic() - start
    time.sleep(0.3)  # gauges are published every 0.1 s
    return waited


@pytest.fixture(autouse=True)
def _server_idle_before(server):
    wait_until_idle(server.metrics_url)


def test_short_chat_four_users_twenty_seconds(server, tmp_path):
    import matplotlib.image as mpimg

    tokens_before = metric(server.metrics_url, "vllm:generation_tokens_total")
    with RunningMax(server.metrics_url, "vllm:num_requests_running") as running:
        summary = run_scenario(server, tmp_path, "short_chat", "20s")

    samples = read_samples([tmp_path / f"raw-u{USERS}.jsonl"])
    assert len(samples) >= 8, f"only {len(samples)} requests in 20 s"
    assert all(s["status"] == "ok" and s["error"] is None for s in samples)
    assert all(s["protocol"] == "grpc" and s["scenario"] == "short_chat" for s in samples)
    for s in samples:  # greedy, 64 tokens unless EOS came first
        assert 0 < s["num_output_tokens"] <= 64 and sum(s["chunk_tokens"]) == s["num_output_tokens"]
        assert s["finish_reason"] == "stop" or s["num_output_tokens"] == 64
        assert 10 < s["num_input_tokens"] < 60
        assert s["t0"] < s["t_first"] <= s["t_last"]
    # gevent: the users of one Locust process really stream at the same time
    assert max_overlap(samples) == USERS
    assert running.value >= 2, "the server never saw two requests at once"
    time.sleep(0.3)
    assert metric(server.metrics_url, "vllm:generation_tokens_total") - tokens_before >= sum(
        s["num_output_tokens"] for s in samples)

    # Locust's own accounting: no failures, the METRIC pseudo-requests kept out of the totals
    with open(tmp_path / f"locust-u{USERS}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    assert int(rows[("", "Aggregated")]["Request Count"]) == int(rows[("gRPC", "chat")]["Request Count"])
    assert int(rows[("METRIC", "ttft")]["Request Count"]) > 0 and int(rows[("METRIC", "itl")]["Request Count"]) > 0

    (run,) = summary["runs"]
    assert run["concurrency"] == USERS and run["num_errors"] == 0
    assert run["num_completed"] == len(samples) and run["output_tokens"] == sum(s["num_output_tokens"] for s in samples)
    ttft, itl = run["time_to_first_token_ms"], run["inter_token_latency_ms"]
    assert 0 < ttft["min"] <= ttft["p50"] <= ttft["max"] and 0 < itl["p50"] < 1000
    report = tmp_path / "report"
    with open(report / "requests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(samples) and {r["status"] for r in rows} == {"ok"}
    pngs = [Path(p) for name, p in summary["files"].items() if p.endswith(".png")]
    assert report / "latency_cdf.png" in pngs
    for png in pngs:
        assert png.stat().st_size > 10_000
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # lines drawn, not a blank canvas


def test_cancel_churn_leaves_no_request_state_or_kv(server, tmp_path):
    with RunningMax(server.metrics_url, "vllm:num_requests_running") as running:
        summary = run_scenario(server, tmp_path, "cancel_churn", "10s")
        # abandoned streams stop: no pile-up behind the users (one more while a cancel lands), and the
        # requests Locust cut off at the end (up to 256 tokens, ~10 s here) are gone at once
        idle_after_s = wait_until_idle(server.metrics_url, timeout=30.0)
    print(f"cancel_churn: idle {idle_after_s:.2f} s after the run, at most {running.value:.0f} requests running")
    assert running.value <= USERS + 1, f"{running.value:.0f} requests running for {USERS} users"
    assert idle_after_s < 5.0, f"requests cut off at the end still ran for {idle_after_s:.1f} s"
    (run,) = summary["runs"]
    assert run["num_errors"] == 0 and run["num_cancelled"] >= 2, run
    samples = read_samples([tmp_path / f"raw-u{USERS}.jsonl"])
    for s in samples:
        if s["status"] == "cancelled":  # abandoned after a drawn number (1..64) of tokens
            assert 1 <= s["num_output_tokens"] <= 64 + 4 and s["finish_reason"] == "cancelled"

    assert metric(server.metrics_url, "vllm:num_requests_running") == 0
    assert metric(server.metrics_url, "vllm:num_requests_waiting") == 0
    used = metric_samples(server.metrics_url, "dsv4_kv_blocks_used")
    decode = [(labels["pool"], value) for labels, value in used if labels.get("stage") == "decode"]
    assert len(decode) >= 3, used
    assert all(value == 0 for _, value in decode), decode
    assert all(value == 0 for labels, value in used if labels.get("stage") == "prefill"), used
