"""The trace reader behind scripts/profile_colocated.py, on a small made-up Kineto trace."""

import json

from dsv4.scripts import trace_overlap


def _kernel(name, stream, ts, dur, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, "correlation": corr}}


def _launch(ts, corr):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": 5, "args": {"correlation": corr}}


def test_steps_gaps_and_the_kernels_beside_the_slow_step(tmp_path):
    events = [
        # three decode steps on stream 7 (two kernels each); the third is stretched by a prefill kernel
        _launch(0, 1), _kernel("d1", 7, 10, 100, 1), _kernel("d2", 7, 120, 100, 1),
        _launch(200, 2), _kernel("d1", 7, 230, 100, 2), _kernel("d2", 7, 340, 100, 2),
        _launch(430, 3), _kernel("d1", 7, 450, 100, 3), _kernel("d2", 7, 2000, 100, 3),
        _kernel("indexer_scores", 13, 500, 1600, 50), _kernel("moe", 13, 2200, 300, 51), _kernel("moe", 13, 2400, 50, 52),
        {"ph": "i", "name": "marker", "ts": 1},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))

    summary = trace_overlap.analyse(path, worst=1)
    assert summary["steps"] == 3 and summary["other_stream_kernels"] == 3
    assert summary["span_ms"]["max"] == 1.65  # 450 .. 2100 us
    worst = summary["worst_steps"][0]
    assert worst["gap_ms"] == 1.66 and worst["span_ms"] == 1.65 and worst["queued_ms"] == 0.02
    assert [k["name"] for k in worst["overlapping"]] == ["indexer_scores"]
    assert summary["other_kernels_by_max_ms"][0] == {"name": "indexer_scores", "count": 1, "total_ms": 1.6, "max_ms": 1.6}

    busy = trace_overlap.busy(path)  # 500..2100 and 2200..2500 (the two moe kernels overlap)
    assert busy == {"span_ms": 2.0, "busy_ms": 1.9, "kernels": 3}


def test_a_trace_without_graph_launches_has_no_steps(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([_kernel("k", 3, 0, 10, 9)]))
    summary = trace_overlap.analyse(path)
    assert summary["steps"] == 0 and summary["other_stream_kernels"] == 1 and summary["gap_ms"]["p50"] is None
