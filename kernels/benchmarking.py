"""Benchmark harness shared by the ops' `bench.py`: model shapes, ceilings, timing, rows, markdown.

Everything that needs a GPU is behind `measure_ceilings` / `time_us`; shapes, rows and the table
formatting are plain Python so they can be tested on a CPU.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The attention-side dimensions a benchmark needs (V4-Flash / V4-Pro)."""

    name: str
    heads: int
    topk: int
    window: int = 128
    head_dim: int = 512
    rope_dim: int = 64
    index_heads: int = 64
    index_dim: int = 128
    csa_rate: int = 4
    hca_rate: int = 128
    block_positions: int = 256  # positions per logical KV block

    @property
    def csa_entries(self) -> int:
        return self.block_positions // self.csa_rate

    @property
    def hca_entries(self) -> int:
        return self.block_positions // self.hca_rate


MODELS = {
    "flash": ModelShape("V4-Flash", heads=64, topk=512),
    "pro": ModelShape("V4-Pro", heads=128, topk=1024),
}


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured on the benchmark's GPU: device-to-device copy bandwidth and dense bf16 matmul rate."""

    hbm_gbps: float
    bf16_tflops: float
    device_name: str = ""


@dataclasses.dataclass
class BenchRow:
    op: str
    config: str
    us: float | None  # None: skipped (see note)
    bytes: int = 0
    flops: int = 0
    ref_us: float | None = None
    note: str = ""

    def gbps(self) -> float | None:
        return None if not self.us else self.bytes / (self.us * 1e3)

    def tflops(self) -> float | None:
        return None if not self.us else self.flops / (self.us * 1e6)

    def floor_us(self, ceil: Ceilings) -> float:
        """The roofline time: max(bytes / bandwidth, flops / bf16 peak)."""
        return max(self.bytes / (ceil.hbm_gbps * 1e3), self.flops / (ceil.bf16_tflops * 1e6))

    def roofline(self, ceil: Ceilings) -> float | None:
        return None if not self.us else self.floor_us(ceil) / self.us

    def speedup(self) -> float | None:
        return None if not (self.us and self.ref_us) else self.ref_us / self.us


def skipped(op: str, config: str, why: str) -> BenchRow:
    return BenchRow(op=op, config=config, us=None, note=f"skipped: {why}")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[BenchRow], ceil: Ceilings) -> str:
    """Rows as a markdown table: µs, GB/s, TFLOP/s, fraction of the roofline, speed-up over the torch reference."""
    lines = [
        "| op | config | µs | GB/s | TFLOP/s | roofline | torch ref µs | speed-up | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.config} | {_fmt(r.us, '.1f')} | {_fmt(r.gbps(), '.0f')} | {_fmt(r.tflops(), '.1f')} | "
            f"{_fmt(r.roofline(ceil), '.0%')} | {_fmt(r.ref_us, '.1f')} | {_fmt(r.speedup(), '.1f')}{'x' if r.speedup() else ''} | {r.note} |"
        )
    return "\n".join(lines)


def bench_device() -> torch.device:
    """The GPU; the CPU (Triton interpreter) only for smoke runs of the benchmark code itself."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def commit_name() -> str:
    """The commit a benchmark ran: $DSV4_COMMIT (the GPU machine's copy of the tree has no git
    history), else git's short hash, else "n/a"."""
    commit = os.environ.get("DSV4_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "n/a"
    return out.stdout.strip() or "n/a"


ONCE_ENV = "DSV4_BENCH_ONCE"  # set: time_us runs fn once, untimed (a profiler such as ncu sees one launch)
ONCE_RANGE = "dsv4_timed"  # the NVTX range around that call: what a profiler should look at (warm, not the checks)


def time_us(fn: Callable[[], object], rep_ms: int = 60, graph: bool = False) -> float:
    """Median time of fn in µs: triton.testing.do_bench (warm-up, L2 flushed between runs), or with
    `graph=True` replays of a CUDA graph of fn (device time without Python launch overhead, as a
    graph-captured decode step sees it); falls back to do_bench when fn cannot be captured.
    With DSV4_BENCH_ONCE set, fn runs once and the time is NaN (`scripts/ncu_kernels.py`)."""
    if os.environ.get(ONCE_ENV):
        if torch.cuda.is_available():
            fn()  # the warm-up the timed runs would have had
            torch.cuda.synchronize()
            with torch.cuda.nvtx.range(ONCE_RANGE):
                fn()
            torch.cuda.synchronize()
        else:
            fn()
        return float("nan")
    if not torch.cuda.is_available():
        import time

        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    import triton.testing

    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")) * 1e3
        except Exception:  # noqa: BLE001 - host syncs inside fn make it uncapturable: time it eagerly
            torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=15, rep=rep_ms, return_mode="median")) * 1e3


def measure_ceilings(device: torch.device | None = None) -> Ceilings:
    """Copy bandwidth (1 GiB device-to-device, bytes read + written) and 8192^3 bf16 matmul rate on random data."""
    device = device or torch.device("cuda")
    x = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    copy_us = statistics.median(time_us(lambda: y.copy_(x)) for _ in range(3))
    hbm = 2 * x.numel() * 4 / (copy_us * 1e3)
    del x, y
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_us = statistics.median(time_us(lambda: a @ b, rep_ms=200) for _ in range(3))
    return Ceilings(hbm_gbps=hbm, bf16_tflops=2 * n**3 / (mm_us * 1e6), device_name=torch.cuda.get_device_name(device))


def fits(device: torch.device, need_bytes: int, fraction: float = 0.8) -> bool:
    if device.type != "cuda":
        return need_bytes < (1 << 30)
    free, _ = torch.cuda.mem_get_info(device)
    return need_bytes <= fraction * free


class CheckFailed(AssertionError):
    """The kernel disagreed with its reference: the row is reported as failed and never timed."""
