"""Read a torch.profiler (Kineto) Chrome trace of decode beside prefill: where decode's steps wait.

Each decode step is one CUDA-graph launch; its kernels carry the launch's correlation id. For every
step this gives when the host launched it, when its first kernel started on the GPU, and when its
last one ended, so a slow step reads as host-late (the launch came late: the thread waited for the
GIL or did other work), queued (launched on time, started late), or stretched (its kernels ran
slowly: the SMs were held by the other stream's blocks), with the other stream's kernels that
overlapped it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Kernel:
    name: str
    stream: int
    start_us: float
    end_us: float
    correlation: int


@dataclass(frozen=True)
class Step:
    launch_us: float  # host: the cudaGraphLaunch call began
    start_us: float  # GPU: its first kernel began
    end_us: float  # GPU: its last kernel ended
    kernels: int


def read_trace(path: str | Path) -> tuple[list[Kernel], dict[int, float]]:
    """The trace's kernels, and the host start of every cudaGraphLaunch by correlation id."""
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    kernels, launches = [], {}
    for e in events:
        if e.get("ph") != "X":
            continue
        args = e.get("args", {})
        if e.get("cat") == "kernel":
            kernels.append(Kernel(e["name"], int(args.get("stream", -1)), float(e["ts"]),
                                  float(e["ts"]) + float(e.get("dur", 0)), int(args.get("correlation", -1))))
        elif e.get("cat") == "cuda_runtime" and e.get("name", "").startswith("cudaGraphLaunch"):
            launches[int(args.get("correlation", -1))] = float(e["ts"])
    return kernels, launches


def graph_steps(kernels: list[Kernel], launches: dict[int, float]) -> tuple[list[Step], set[int]]:
    """One Step per graph launch (in launch order), and the streams the graphs' kernels ran on."""
    by_launch: dict[int, list[Kernel]] = defaultdict(list)
    for k in kernels:
        if k.correlation in launches:
            by_launch[k.correlation].append(k)
    steps = [Step(launches[c], min(k.start_us for k in ks), max(k.end_us for k in ks), len(ks))
             for c, ks in by_launch.items()]
    return sorted(steps, key=lambda s: s.launch_us), {k.stream for ks in by_launch.values() for k in ks}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank percentiles (the smallest value with at least q of the values at or below it)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    pick = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def overlapping(kernels: list[Kernel], lo: float, hi: float) -> list[tuple[Kernel, float]]:
    """Kernels overlapping [lo, hi] with the microseconds each overlaps, longest overlap first."""
    found = [(k, min(k.end_us, hi) - max(k.start_us, lo)) for k in kernels if k.start_us < hi and k.end_us > lo]
    return sorted(found, key=lambda item: -item[1])


def analyse(path: str | Path, worst: int = 8) -> dict:
    """Per-step figures (ms percentiles) and, for the `worst` steps by the gap since the previous
    step's end, the other stream's kernels that overlapped them."""
    kernels, launches = read_trace(path)
    steps, decode_streams = graph_steps(kernels, launches)
    others = [k for k in kernels if k.stream not in decode_streams]
    pairs = list(zip(steps, steps[1:]))
    summary = {
        "steps": len(steps),
        "other_stream_kernels": len(others),
        "gap_ms": _percentiles([(b.end_us - a.end_us) / 1e3 for a, b in pairs]),
        "launch_interval_ms": _percentiles([(b.launch_us - a.launch_us) / 1e3 for a, b in pairs]),
        "queued_ms": _percentiles([(s.start_us - s.launch_us) / 1e3 for s in steps]),
        "span_ms": _percentiles([(s.end_us - s.start_us) / 1e3 for s in steps]),
    }
    longest = defaultdict(lambda: [0, 0.0, 0.0])  # name -> count, total us, max us
    for k in others:
        entry = longest[k.name]
        entry[0] += 1
        entry[1] += k.end_us - k.start_us
        entry[2] = max(entry[2], k.end_us - k.start_us)
    summary["other_kernels_by_max_ms"] = [
        {"name": name[:90], "count": n, "total_ms": total / 1e3, "max_ms": most / 1e3}
        for name, (n, total, most) in sorted(longest.items(), key=lambda item: -item[1][2])[:12]]
    slow = sorted(pairs, key=lambda ab: -(ab[1].end_us - ab[0].end_us))[:worst]
    # the window a slow step lost time in: from when it could have run (its launch, or the previous
    # step's end if later) to its end, so kernels it queued behind count as well as those beside it
    summary["worst_steps"] = [{
        "gap_ms": (b.end_us - a.end_us) / 1e3,
        "launch_late_ms": (b.launch_us - a.end_us) / 1e3,  # > 0: launched after the previous step ended
        "queued_ms": (b.start_us - b.launch_us) / 1e3,
        "span_ms": (b.end_us - b.start_us) / 1e3,
        "overlapping": [{"name": k.name[:90], "overlap_ms": us / 1e3, "dur_ms": (k.end_us - k.start_us) / 1e3}
                        for k, us in overlapping(others, max(a.end_us, b.launch_us), b.end_us)[:4]],
    } for a, b in slow]
    return summary


def busy(path: str | Path) -> dict:
    """The non-graph (prefill) kernels' first start to last end, and the time at least one ran in it:
    busy well below the span means the passes were bound by the host, not the GPU."""
    kernels, launches = read_trace(path)
    _, decode_streams = graph_steps(kernels, launches)
    others = sorted((k for k in kernels if k.stream not in decode_streams), key=lambda k: k.start_us)
    if not others:
        return {"span_ms": 0.0, "busy_ms": 0.0, "kernels": 0}
    covered, reach = 0.0, others[0].start_us
    for k in others:
        if k.end_us > reach:
            covered += k.end_us - max(k.start_us, reach)
            reach = k.end_us
    return {"span_ms": (reach - others[0].start_us) / 1e3, "busy_ms": covered / 1e3, "kernels": len(others)}
