"""Unit tests of the load-test report, samples and scenarios (synthetic data, no server)."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # load_tests is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from dsv4.client import StreamChunk  # noqa: E402
from load_tests import report  # noqa: E402
from load_tests.samples import RawSample, SampleWriter, Trace, read_samples  # noqa: E402
from load_tests.scenario import Pacer, Pacing, list_scenarios, load_scenario, synthetic_text  # noqa: E402


def sample(t0, ttft, latency, n_out, *, status="ok", users=4, run_id="r1", source="", n_in=10, chunks=None,
           error=None):
    if chunks is None:
        chunks = list(np.linspace(ttft, latency, n_out)) if n_out else []
    return {
        "run_id": run_id, "scenario": "s", "protocol": "grpc", "request_name": "chat", "user_id": 0, "users": users,
        "t0": t0, "t_first": None if ttft is None else t0 + ttft, "t_last": None if latency is None else t0 + latency,
        "chunk_times": chunks, "chunk_tokens": [1] * len(chunks), "num_input_tokens": n_in,
        "num_output_tokens": n_out, "finish_reason": "length", "status": status, "error": error,
        "error_type": None if error is None else "Unavailable", "source": source,
    }


SAMPLES = [
    # ttft 0.1 s, latency 1.1 s, 11 tokens -> ITL 100 ms
    sample(100.0, 0.1, 1.1, 11),
    # ttft 0.2 s, latency 0.6 s, 5 tokens -> ITL 100 ms
    sample(100.5, 0.2, 0.6, 5),
    # ttft 0.3 s, latency 2.3 s, 21 tokens -> ITL 100 ms; last response at 103.3
    sample(101.0, 0.3, 2.3, 21),
    # one token: latency counted, no ITL
    sample(101.5, 0.4, 0.4, 1),
    # cancelled after 3 tokens: TTFT and tokens count, latency and ITL do not
    sample(102.0, 0.5, 0.7, 3, status="cancelled"),
    # failed: only counted
    sample(102.5, None, 0.05, 0, status="error", error="server is full"),
]


def test_describe_matches_numpy_linear_percentiles():
    stats = report.describe(range(1, 101))
    assert stats["count"] == 100 and stats["avg"] == 50.5 and stats["min"] == 1 and stats["max"] == 100
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05) and stats["p99"] == pytest.approx(99.01)
    assert stats["std"] == pytest.approx(np.std(np.arange(1, 101)))
    assert report.describe([]) is None


def test_request_metrics_definitions():
    m = report.request_metrics(SAMPLES[0])
    assert m["time_to_first_token_ms"] == pytest.approx(100.0)
    assert m["request_latency_ms"] == pytest.approx(1100.0)
    assert m["inter_token_latency_ms"] == pytest.approx(100.0)
    assert m["output_token_throughput_per_user"] == pytest.approx(10.0)
    assert m["time_to_second_token_ms"] == pytest.approx(100.0)
    assert report.request_metrics(SAMPLES[3])["inter_token_latency_ms"] is None
    cancelled = report.request_metrics(SAMPLES[4])
    assert cancelled["time_to_first_token_ms"] == pytest.approx(500.0)
    assert cancelled["request_latency_ms"] is None and cancelled["inter_token_latency_ms"] is None


def test_run_metrics_known_answers():
    m = report.run_metrics(SAMPLES)
    assert (m["num_requests"], m["num_completed"], m["num_cancelled"], m["num_errors"]) == (6, 4, 1, 1)
    assert m["errors"] == {"Unavailable": 1}
    # first send 100.0, last response 103.3 (the error is not part of the window)
    assert m["duration_s"] == pytest.approx(3.3)
    assert m["output_tokens"] == 11 + 5 + 21 + 1 + 3
    assert m["output_token_throughput_per_s"] == pytest.approx(41 / 3.3)
    assert m["request_throughput_per_s"] == pytest.approx(4 / 3.3)
    ttft = m["time_to_first_token_ms"]
    assert ttft["count"] == 5 and ttft["avg"] == pytest.approx(300.0) and ttft["p50"] == pytest.approx(300.0)
    assert ttft["min"] == pytest.approx(100.0) and ttft["max"] == pytest.approx(500.0)
    lat = m["request_latency_ms"]
    assert lat["count"] == 4 and lat["avg"] == pytest.approx((1100 + 600 + 2300 + 400) / 4)
    itl = m["inter_token_latency_ms"]
    assert itl["count"] == 3 and itl["avg"] == pytest.approx(100.0) and itl["std"] == pytest.approx(0.0, abs=1e-9)
    assert m["output_sequence_length"]["max"] == 21 and m["input_sequence_length"]["avg"] == 10


def test_summary_groups_runs_and_drops_warmup():
    low = [dict(s, run_id="u1", users=1) for s in SAMPLES]
    high = [dict(s, run_id="u8", users=8, t0=s["t0"] + 1000,
                 t_first=None if s["t_first"] is None else s["t_first"] + 1000, t_last=s["t_last"] + 1000)
            for s in SAMPLES]
    summary = report.compute_summary(low + high)
    assert [r["concurrency"] for r in summary["runs"]] == [1, 8]
    assert summary["overall"]["num_requests"] == 12
    warm = report.compute_summary(low, warmup_s=1.0)
    assert warm["runs"][0]["num_requests"] == 4  # requests sent at 100.0 and 100.5 dropped


def test_write_report_files_and_plots(tmp_path):
    import matplotlib.image as mpimg

    raw = []
    for users, run_id in ((1, "u1"), (4, "u4")):
        path = tmp_path / f"raw-{run_id}.jsonl"
        path.write_text("".join(json.dumps(dict(s, run_id=run_id, users=users)) + "\n" for s in SAMPLES))
        raw.append(path)
    out = tmp_path / "report"
    summary = report.write_report([str(tmp_path / "raw-*.jsonl")], out)
    assert len(summary["runs"]) == 2
    saved = json.loads((out / "summary.json").read_text())
    assert saved["runs"][0]["time_to_first_token_ms"]["p50"] == pytest.approx(300.0)
    with open(out / "requests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok", "cancelled", "error"}
    for name in ("latency_cdf.png", "throughput_vs_concurrency.png"):
        png = out / name
        assert png.stat().st_size > 1000
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # a single concurrency level gives no throughput-vs-concurrency plot
    one = report.write_report([raw[0]], tmp_path / "one")
    assert "throughput_vs_concurrency" not in one["files"] and (tmp_path / "one" / "latency_cdf.png").exists()


def test_report_command_line(tmp_path, capsys):
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert "ttft p50" in capsys.readouterr().out
    assert (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / "latency_cdf.png").exists()


def test_trace_to_sample_roundtrip(tmp_path):
    trace = Trace(t0_wall=1000.0, t0_perf=50.0)
    trace.add(StreamChunk("", (), 50.01, "", 7, 0))
    trace.add(StreamChunk("ab", (1, 2), 50.1, "", 7, 2))
    trace.add(StreamChunk("c", (3,), 50.3, "length", 7, 3))
    s = trace.sample(end_perf=50.35, status="ok", error=None, run_id="r", scenario="s", protocol="http",
                     request_name="chat", user_id=3, users=2)
    assert s.t_first == pytest.approx(1000.1) and s.t_last == pytest.approx(1000.3)
    assert s.chunk_tokens == [0, 2, 1] and s.num_output_tokens == 3 and s.finish_reason == "length"
    cancelled = trace.sample(end_perf=50.4, status="cancelled", error=None, run_id="r", scenario="s",
                             protocol="http", request_name="chat", user_id=3, users=2)
    assert cancelled.t_last == pytest.approx(1000.4) and cancelled.finish_reason == "cancelled"
    writer = SampleWriter(tmp_path / "sub" / "raw.jsonl")
    writer.write(s)
    writer.write(cancelled)
    writer.close()
    loaded = read_samples([tmp_path / "sub" / "raw.jsonl"])
    assert [x["status"] for x in loaded] == ["ok", "cancelled"]
    assert set(loaded[0]) >= set(RawSample.__dataclass_fields__)
    m = report.request_metrics(loaded[0])
    assert m["time_to_first_token_ms"] == pytest.approx(100.0) and m["inter_token_latency_ms"] == pytest.approx(100.0)


def test_scenarios_load_and_are_deterministic():
    names = list_scenarios()
    assert {"short_chat", "long_prompt", "mixed", "cancel_churn", "poisson"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        a, b = random.Random(1), random.Random(1)
        spec = scenario.pick(a)
        assert scenario.build_request(spec, a, 0) == scenario.build_request(scenario.pick(b), b, 0)
    long = load_scenario("long_prompt")
    request = long.build_request(long.requests[0], random.Random(0), 0)
    assert len(request.text_input.split()) >= 4500
    assert synthetic_text(300, 7) == synthetic_text(300, 7) != synthetic_text(300, 8)
    churn = load_scenario("cancel_churn")
    points = [churn.cancel_after(random.Random(i)) for i in range(200)]
    cut = [p for p in points if p is not None]
    assert 60 < len(cut) < 140 and min(cut) >= 1 and max(cut) <= 64
    assert load_scenario("poisson").pacing == Pacing("poisson", rate_per_s=2.0)
    with pytest.raises(FileNotFoundError):
        load_scenario("no_such_scenario")


def test_poisson_pacer_gaps_and_late_starts():
    now = [0.0]
    pacer = Pacer(Pacing("poisson", rate_per_s=4.0), random.Random(3), users=2, clock=lambda: now[0])
    gaps = [pacer.wait_s() for _ in range(4000)]
    # per-user rate 2/s -> exponential gaps of mean 0.5 s
    assert np.mean(gaps) == pytest.approx(0.5, rel=0.06)
    pacer.started()
    now[0] = 100.0  # the request took far longer than any gap
    assert pacer.wait_s() == 0.0 and pacer.late == 1
    closed = Pacer(Pacing("closed", think_time_s=0.25), random.Random(0), users=1)
    assert closed.wait_s() == 0.25


def test_locustfile_loads_in_locust():
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "load_tests" / "locustfile.py"), "--list"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "GrpcStreamUser" in result.stdout and "HttpStreamUser" in result.stdout
