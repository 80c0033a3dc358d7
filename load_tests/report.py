"""genai-perf style metrics and plots from raw load-test samples (JSONL from the locustfile).

    python -m load_tests.report runs/short/*.jsonl --out runs/short/report [--warmup-s 5]

Definitions (per request, genai-perf's): TTFT = first chunk with tokens - send; request
latency = last response - send; ITL = (latency - TTFT) / (output tokens - 1), only with more
than one token; time to second token = second token-carrying chunk - first; output token
throughput per user = 1 / ITL. Per run: duration = last response - first send; output token
throughput = output tokens / duration; request throughput = completed requests / duration.
Statistics: avg, min, max, std (population), p50/p90/p95/p99 (numpy linear interpolation).

Which requests count: latencies and ITL use completed requests ("ok"); TTFT also uses requests
the client abandoned on purpose ("cancelled", they did get a first token); output token
throughput counts the tokens of both; failed requests are only counted. A run is one input file
and run id; its concurrency is the largest user count seen in its samples.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from load_tests.samples import read_samples
except ImportError:  # run as a script from inside load_tests/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from load_tests.samples import read_samples

__all__ = ["compute_summary", "describe", "main", "print_table", "request_metrics", "run_metrics", "write_report"]

PERCENTILES = (50, 90, 95, 99)
METRICS = (
    "time_to_first_token_ms",
    "inter_token_latency_ms",
    "request_latency_ms",
    "time_to_second_token_ms",
    "output_token_throughput_per_user",
    "output_sequence_length",
    "input_sequence_length",
)
CSV_FIELDS = (
    "run", "scenario", "protocol", "concurrency", "request_name", "user_id", "status", "t0",
    "time_to_first_token_ms", "request_latency_ms", "inter_token_latency_ms", "time_to_second_token_ms",
    "num_input_tokens", "num_output_tokens", "finish_reason", "error",
)


def describe(values: Iterable[float]) -> dict[str, float] | None:
    """avg/min/max/std/p50/p90/p95/p99 and count of ``values`` (None when there are none)."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return None
    out = {"count": int(a.size), "avg": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
           "std": float(a.std())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    return out


def request_metrics(sample: dict[str, Any]) -> dict[str, Any]:
    """Per-request metrics (ms / tokens) of one raw sample; None where not defined."""
    t0 = sample["t0"]
    status = sample.get("status", "ok")
    ttft = None if sample.get("t_first") is None else (sample["t_first"] - t0) * 1e3
    latency = None if sample.get("t_last") is None else (sample["t_last"] - t0) * 1e3
    n_out = int(sample.get("num_output_tokens") or 0)
    itl = None
    if status == "ok" and ttft is not None and latency is not None and n_out > 1:
        itl = (latency - ttft) / (n_out - 1)
    times = sample.get("chunk_times") or []
    tokens = sample.get("chunk_tokens") or [1] * len(times)
    token_chunks = [t for t, n in zip(times, tokens, strict=False) if n > 0]
    ttst = (token_chunks[1] - token_chunks[0]) * 1e3 if len(token_chunks) > 1 else None
    return {
        "status": status,
        "t0": t0,
        "time_to_first_token_ms": ttft if status in ("ok", "cancelled") else None,
        "request_latency_ms": latency if status == "ok" else None,
        "inter_token_latency_ms": itl,
        "time_to_second_token_ms": ttst if status == "ok" else None,
        "output_token_throughput_per_user": None if not itl else 1e3 / itl,
        "output_sequence_length": n_out if status == "ok" else None,
        "input_sequence_length": sample.get("num_input_tokens") if status == "ok" else None,
        "num_output_tokens": n_out,
    }


def _drop_warmup(samples: list[dict[str, Any]], warmup_s: float) -> list[dict[str, Any]]:
    if warmup_s <= 0 or not samples:
        return samples
    start = min(s["t0"] for s in samples) + warmup_s
    return [s for s in samples if s["t0"] >= start]


def run_metrics(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts, duration, throughputs and statistics of one run's samples."""
    per_request = [request_metrics(s) for s in samples]
    statuses = Counter(m["status"] for m in per_request)
    counted = [(s, m) for s, m in zip(samples, per_request, strict=True) if m["status"] != "error"]
    duration = 0.0
    if counted:
        first_send = min(s["t0"] for s, _ in counted)
        last_response = max(s["t_last"] if s.get("t_last") is not None else s["t0"] for s, _ in counted)
        duration = max(0.0, last_response - first_send)
    tokens = sum(m["num_output_tokens"] for _, m in counted)
    out: dict[str, Any] = {
        "num_requests": len(samples),
        "num_completed": statuses.get("ok", 0),
        "num_cancelled": statuses.get("cancelled", 0),
        "num_errors": statuses.get("error", 0),
        "errors": dict(Counter(s.get("error_type") or "?" for s in samples if s.get("status") == "error")),
        "duration_s": duration,
        "output_tokens": tokens,
        "output_token_throughput_per_s": tokens / duration if duration > 0 else None,
        "request_throughput_per_s": statuses.get("ok", 0) / duration if duration > 0 else None,
    }
    for name in METRICS:
        out[name] = describe(m[name] for m in per_request)
    return out


def _run_key(sample: dict[str, Any]) -> tuple[str, str]:
    return (str(sample.get("source", "")), str(sample.get("run_id", "")))


def compute_summary(samples: Sequence[dict[str, Any]], *, warmup_s: float = 0.0) -> dict[str, Any]:
    """Metrics per run and over all samples (``warmup_s`` is dropped from the start of each run)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        groups[_run_key(s)].append(s)
    runs = []
    kept: list[dict[str, Any]] = []
    for (source, run_id), group in groups.items():
        group = _drop_warmup(sorted(group, key=lambda s: s["t0"]), warmup_s)
        if not group:
            continue
        kept.extend(group)
        runs.append({
            "run": f"{Path(source).stem}:{run_id}" if source else run_id,
            "source": source,
            "run_id": run_id,
            "scenario": ",".join(sorted({str(s.get("scenario", "")) for s in group})),
            "protocol": ",".join(sorted({str(s.get("protocol", "")) for s in group})),
            "concurrency": max(int(s.get("users") or 0) for s in group),
            **run_metrics(group),
        })
    runs.sort(key=lambda r: (r["scenario"], r["protocol"], r["concurrency"], r["run"]))
    return {"warmup_s": warmup_s, "runs": runs, "overall": run_metrics(kept) if kept else None}


def _write_csv(path: Path, samples: Sequence[dict[str, Any]], runs: dict[tuple[str, str], dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for s in sorted(samples, key=lambda s: s["t0"]):
            run = runs.get(_run_key(s))
            if run is None:
                continue
            m = request_metrics(s)
            writer.writerow({
                **m,
                "run": run["run"],
                "scenario": s.get("scenario", ""),
                "protocol": s.get("protocol", ""),
                "concurrency": run["concurrency"],
                "request_name": s.get("request_name", ""),
                "user_id": s.get("user_id", ""),
                "num_input_tokens": s.get("num_input_tokens"),
                "finish_reason": s.get("finish_reason", ""),
                "error": s.get("error") or "",
            })


def _label(run: dict[str, Any]) -> str:
    return f"{run['scenario']} {run['protocol']} c={run['concurrency']}"


def _plot_cdfs(path: Path, samples_by_run: dict[str, list[dict[str, Any]]], runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("time_to_first_token_ms", "TTFT (ms)"), ("inter_token_latency_ms", "inter-token latency (ms)"),
              ("request_latency_ms", "request latency (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for run in runs:
            values = np.sort([v for s in samples_by_run[run["run"]]
                              if (v := request_metrics(s)[metric]) is not None])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=_label(run))
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(path: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        series[f"{run['scenario']} {run['protocol']}"].append(run)
    fig, (ax_tok, ax_req, ax_lat) = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (name, points) in enumerate(series.items()):
        color = f"C{i % 10}"
        points = sorted(points, key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in points]
        ax_tok.plot(x, [r["output_token_throughput_per_s"] or 0 for r in points], "o-", color=color, label=name)
        ax_req.plot(x, [r["request_throughput_per_s"] or 0 for r in points], "o-", color=color, label=name)
        for key, style in (("p50", "o-"), ("p99", "s--")):
            y = [(r["time_to_first_token_ms"] or {}).get(key, np.nan) for r in points]
            ax_lat.plot(x, y, style, color=color, label=f"{name} TTFT {key}")
    for ax, title in ((ax_tok, "output tokens/s"), (ax_req, "requests/s"), (ax_lat, "TTFT (ms)")):
        ax.set_xlabel("concurrency (users)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("throughput and TTFT vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(inputs: Sequence[str | Path] | Sequence[dict[str, Any]], out_dir: str | Path, *,
                 warmup_s: float = 0.0, plots: bool = True) -> dict[str, Any]:
    """Write summary.json, requests.csv and the plots to ``out_dir``; returns the summary.

    ``inputs`` are JSONL paths (globs allowed) or already loaded samples.
    """
    samples = [s for s in inputs if isinstance(s, dict)]
    paths = [p for p in inputs if not isinstance(p, dict)]
    if paths:
        samples += read_samples(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = compute_summary(samples, warmup_s=warmup_s)
    runs_by_key = {(r["source"], r["run_id"]): r for r in summary["runs"]}
    # the samples each run kept after warm-up
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        run = runs_by_key.get(_run_key(s))
        if run is not None:
            by_run[run["run"]].append(s)
    for name, group in by_run.items():
        by_run[name] = _drop_warmup(group, warmup_s)
    kept = [s for group in by_run.values() for s in group]
    files = {"summary": str(out / "summary.json"), "requests": str(out / "requests.csv")}
    _write_csv(out / "requests.csv", kept, runs_by_key)
    if plots and summary["runs"]:
        _plot_cdfs(out / "latency_cdf.png", by_run, summary["runs"])
        files["latency_cdf"] = str(out / "latency_cdf.png")
        if len({r["concurrency"] for r in summary["runs"]}) > 1:
            _plot_throughput(out / "throughput_vs_concurrency.png", summary["runs"])
            files["throughput_vs_concurrency"] = str(out / "throughput_vs_concurrency.png")
    summary["files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _fmt(stats: dict[str, float] | None, key: str) -> str:
    return "-" if not stats else f"{stats[key]:.1f}"


def print_table(summary: dict[str, Any], out: Any) -> None:
    header = (f"{'run':<28} {'c':>4} {'ok':>6} {'canc':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} "
              f"{'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} {'e2e p50':>9} {'e2e p99':>9}")
    out.write(header + "\n")
    for r in summary["runs"]:
        ttft, itl, e2e = r["time_to_first_token_ms"], r["inter_token_latency_ms"], r["request_latency_ms"]
        req_s = r["request_throughput_per_s"] or 0.0
        tok_s = r["output_token_throughput_per_s"] or 0.0
        out.write(f"{r['run'][:28]:<28} {r['concurrency']:>4} {r['num_completed']:>6} {r['num_cancelled']:>5} "
                  f"{r['num_errors']:>4} {req_s:>7.2f} {tok_s:>8.1f} {_fmt(ttft, 'p50'):>9} "
                  f"{_fmt(ttft, 'p99'):>9} {_fmt(itl, 'p50'):>8} {_fmt(itl, 'p99'):>8} {_fmt(e2e, 'p50'):>9} "
                  f"{_fmt(e2e, 'p99'):>9}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", nargs="+", help="raw JSONL files from the locustfile (globs allowed)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--warmup-s", type=float, default=0.0, help="drop requests sent in the first N s of each run")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.raw, args.out, warmup_s=args.warmup_s, plots=not args.no_plots)
    except FileNotFoundError as e:
        parser.error(str(e))
    print_table(summary, sys.stdout)
    for name, path in summary["files"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
