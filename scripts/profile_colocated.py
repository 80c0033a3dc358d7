"""Where decode's steps and prefill's passes lose time when they share one process and one GPU.

Runs the colocated engines (`backend/serving/colocated.py`) in-process on random flash-mini
weights, without Triton, and profiles two situations with torch.profiler:

- **a long prompt beside running streams**: `--streams` streams decode while one `--long`-token
  prompt is prefilled, once per `--chunks` value. Prints the streams' inter-token gaps quiet and
  during the prefill, how late a thread asking for the GIL every 0.5 ms got it (`GilWatch`), and
  from the trace (`trace_overlap.analyse`) whether the slow steps were launched late (host, GIL),
  queued, or stretched on the GPU, with the prefill kernels beside them.
- **a burst of short prompts**: `--burst` prompts of `--burst-tokens` arrive together, once alone
  and once beside `--busy-streams` decoding streams; prints their first-token times and how busy
  the GPU was with prefill in that span (busy well below the span: the passes are host-bound).

Figures need a GPU (`--device cpu` only checks the script on a small preset). Example: `python scripts/profile_colocated.py --long 131072 --chunks 8192,2048 --json out.json`.
"""

from __future__ import annotations

import argparse
import json
import gc
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dsv4.backend import presets
from dsv4.backend.checkpoint.writer import randomize_weights
from dsv4.backend.model.transformer import Transformer

from dsv4.scripts import trace_overlap
from dsv4.scripts.colocated_rig import Rig


def _gaps_ms(times: dict[int, list[float]], rids, lo: float, hi: float) -> list[float]:
    return [(b - a) * 1e3 for rid in rids for a, b in zip(times[rid], times[rid][1:]) if lo <= b <= hi]


def _pcts(gaps: list[float]) -> dict:
    if not gaps:
        return {"n": 0}
    return {"n": len(gaps), "p50": statistics.median(gaps), "p99": float(np.percentile(gaps, 99)), "max": max(gaps)}


def _free(rig: Rig, trace: Path | None) -> None:
    """Drop a setting's pools before the next one allocates its own (the sinks hold the rig in a cycle)."""
    rig.__dict__.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if trace is not None:
        shutil.rmtree(trace.parent, ignore_errors=True)


def _profiled(fn, cpu_activity: bool):
    """Run fn under torch.profiler (CUDA activity; host ops too with `cpu_activity`, which slows the
    host: CUDA alone keeps the runtime calls); returns fn's result and the trace's path."""
    path = Path(tempfile.mkdtemp()) / "trace.json"
    activities = [*([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
                  *([torch.profiler.ProfilerActivity.CPU] if cpu_activity or not torch.cuda.is_available() else [])]
    with torch.profiler.profile(activities=activities) as prof:
        result = fn()
    prof.export_chrome_trace(str(path))
    return result, path


class GilWatch:
    """A thread that asks for the GIL every `tick_s` and records how late it got it (ms, with the
    time it woke): long lateness while prefill runs means Python held the GIL that long, and a
    decode step launched in that window waited as long."""

    def __init__(self, tick_s: float = 0.0005):
        self.tick_s, self.late = tick_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            time.sleep(self.tick_s)
            now = time.perf_counter()
            self.late.append((now, (now - start - self.tick_s) * 1e3))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, lo: float, hi: float) -> dict:
        return _pcts([ms for at, ms in self.late if lo <= at <= hi])


def long_beside_streams(model, args, chunk: int) -> dict:
    max_len = args.long + 4096
    rig = Rig(model, chunk, 2 * chunk, 8, args.streams + 1, max_len, args.prefill_gib)
    rids, trace, gil = list(range(args.streams)), None, GilWatch()
    try:
        for rid in rids:
            rig.submit(rid, args.stream_prompt)
        rig.pump(lambda: all(len(rig.times[r]) >= 32 for r in rids))
        quiet_from = time.perf_counter()
        rig.pump(lambda: time.perf_counter() - quiet_from > 1.0)
        quiet_to = time.perf_counter()

        def prefill_long():
            rig.submit(1000, args.long, 2)
            rig.pump(lambda: len(rig.times[1000]) >= 1)
            return time.perf_counter()

        first_token, trace = _profiled(prefill_long, args.cpu_activity)
        first_token = rig.times[1000][0]  # its arrival, not when the loop above noticed it
        out = {"chunk": chunk, "long_tokens": args.long, "long_ttft_s": first_token - rig.sent[1000],
               "quiet": _pcts(_gaps_ms(rig.times, rids, quiet_from, quiet_to)),
               "during": _pcts(_gaps_ms(rig.times, rids, rig.sent[1000], first_token)),
               "gil_late_ms": {"quiet": gil.between(quiet_from, quiet_to), "during": gil.between(rig.sent[1000], first_token)},
               "trace": trace_overlap.analyse(trace)}
    finally:
        gil.stop()
        rig.stop()
        _free(rig, trace)
    return out


def burst(model, args, beside: bool, max_prompts: int) -> dict:
    rows = args.busy_streams + args.burst
    rig = Rig(model, args.chunk, args.budget, max_prompts, rows, 4096 + args.burst_tokens, args.prefill_gib)
    busy, trace, gil = (list(range(args.busy_streams)) if beside else []), None, GilWatch()
    try:
        for rid in busy:
            rig.submit(rid, 1024)
        rig.pump(lambda: all(len(rig.times[r]) >= 32 for r in busy))
        burst_rids = list(range(1000, 1000 + args.burst))
        passes_before = len(rig.colocated.prefill.step_sizes)

        def arrive_together():
            for rid in burst_rids:
                rig.submit(rid, args.burst_tokens, 2)
            rig.pump(lambda: all(len(rig.times[r]) >= 1 for r in burst_rids))

        _, trace = _profiled(arrive_together, args.cpu_activity)
        ttfts = sorted(rig.times[r][0] - rig.sent[r] for r in burst_rids)
        lo, hi = min(rig.sent[r] for r in burst_rids), max(rig.times[r][0] for r in burst_rids)
        out = {"beside_streams": len(busy), "prompts": args.burst, "prompt_tokens": args.burst_tokens, "max_prompts": max_prompts,
               "first_ttft_s": ttfts[0], "last_ttft_s": ttfts[-1],
               "passes": len(rig.colocated.prefill.step_sizes) - passes_before,
               "pass_ms": _pcts([1e3 * s for s in list(rig.colocated.prefill.step_seconds)[passes_before:]]),
               "prefill_gpu": trace_overlap.busy(trace), "streams_gap_during": _pcts(_gaps_ms(rig.times, busy, lo, hi)),
               "gil_late_ms": gil.between(lo, hi)}
        if busy:
            out["trace"] = {k: v for k, v in trace_overlap.analyse(trace, worst=3).items()
                            if k in ("gap_ms", "launch_interval_ms", "span_ms", "worst_steps")}
    finally:
        gil.stop()
        rig.stop()
        _free(rig, trace)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash-mini", help="model preset, random weights (default flash-mini)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu runs the same rig without the GPU's figures (a check of the script itself)")
    p.add_argument("--streams", type=int, default=4, help="streams decoding beside the long prompt (default 4)")
    p.add_argument("--stream-prompt", type=int, default=1024, help="their prompt tokens (default 1024)")
    p.add_argument("--long", type=int, default=131072, help="the long prompt's tokens (default 131072; 0: skip)")
    p.add_argument("--chunks", default="8192,2048", help="prefill chunk sizes to try for the long prompt")
    p.add_argument("--switch-intervals", default="0.005",
                   help="Python's GIL switch intervals (s) to run the long prompt under, e.g. 0.005,0.0005 (default: "
                        "Python's 0.005)")
    p.add_argument("--burst", type=int, default=8, help="short prompts arriving together (default 8; 0: skip)")
    p.add_argument("--burst-tokens", type=int, default=1024)
    p.add_argument("--busy-streams", type=int, default=32, help="streams decoding beside the burst (default 32)")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk for the burst (default 8192)")
    p.add_argument("--budget", type=int, default=16384, help="prefill token budget for the burst (default 16384)")
    p.add_argument("--max-prompts", default="32", help="most prompts per prefill pass for the burst; a comma list runs "
                   "the burst once per value (default 32, dsv4-serve's)")
    p.add_argument("--prefill-gib", type=float, default=20.0, help="prefill pool (default 20 GiB)")
    p.add_argument("--cpu-activity", action="store_true", help="profile host ops too (perturbs host-bound passes)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA GPU is visible (--device cpu runs the rig on a small preset)", file=sys.stderr)
        return 2
    with torch.device(args.device):
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = randomize_weights(Transformer(presets.preset(args.preset), dtype), seed=3).eval()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (cpu)"
    report = {"gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}, "long": [], "burst": []}

    def show(name, value):
        print(f"## {name}\n{json.dumps(value, default=str)}", flush=True)

    settings = [(int(c), float(i)) for c in args.chunks.split(",") for i in args.switch_intervals.split(",")]
    for chunk, interval in (settings if args.long else []):
        try:
            sys.setswitchinterval(interval)  # how long a thread may keep the GIL while another waits for it
            report["long"].append({"switch_interval_s": interval, **long_beside_streams(model, args, chunk)})
            show(f"long prompt beside {args.streams} streams, chunk {chunk}, GIL switch interval {interval * 1e3:g} ms",
                 report["long"][-1])
        except Exception as exc:  # the other settings still run
            print(f"chunk {chunk} failed: {exc!r}", flush=True)
    sys.setswitchinterval(0.005)  # Python's default for the bursts
    for max_prompts in (int(m) for m in args.max_prompts.split(",")):
        for beside in ((False, True) if args.burst else ()):
            try:
                report["burst"].append(burst(model, args, beside, max_prompts))
                show(f"burst {'beside streams' if beside else 'alone'}, at most {max_prompts} prompts a pass",
                     report["burst"][-1])
            except Exception as exc:
                print(f"burst (beside={beside}, max prompts {max_prompts}) failed: {exc!r}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
