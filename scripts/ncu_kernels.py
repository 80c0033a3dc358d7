"""Where each attention kernel stands on the GPU, from Nsight Compute's hardware counters.

Runs `scripts/bench_kernels.py` for the ops, models, batches and contexts given, under `ncu` with
every timing loop cut to one untimed call (`DSV4_BENCH_ONCE`), profiling only this project's
Triton kernels and only in that call (an NVTX range), so each launch is warm. Prints one row per kernel and configuration: duration, DRAM bandwidth achieved
and its share of peak, compute (SM) throughput, the busiest tensor pipe, achieved occupancy,
registers per thread and warp cycles per issued instruction; `--json` writes them.

Needs a GPU machine whose runtime lets ncu read counters (Firecracker, not gVisor); clocks are
left alone (`--clock-control none`). Example:
  python scripts/ncu_kernels.py --ops sparse_decode,indexer_topk --models flash --batches 1,128 \\
      --contexts 8192 --json ncu.json
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dsv4.kernels.benchmarking import ONCE_ENV, ONCE_RANGE

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats",
            "WarpStateStats")
# (section, metric) of the details page -> column of the summary
DETAILS = {
    ("GPU Speed Of Light Throughput", "Duration"): "duration",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("Memory Workload Analysis", "Memory Throughput"): "dram_rate",
    ("Occupancy", "Achieved Occupancy"): "occupancy_pct",
    ("Launch Statistics", "Registers Per Thread"): "registers",
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "cycles_per_issue",
}
# ncu versions spell units both ways ("usecond" / "us", "Gbyte/second" / "Gbyte/s")
TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6, "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
RATE_UNITS = {f"{prefix}byte/{per}": scale for prefix, scale in (("", 1e-9), ("K", 1e-6), ("M", 1e-3), ("G", 1.0),
                                                                  ("T", 1e3)) for per in ("second", "s")}
TENSOR_PIPE = re.compile(r"pipe_tensor.*pct_of_peak_sustained_active$")


def kernel_names() -> list[str]:
    """This project's Triton kernels (every `*_kernel` JIT function under dsv4.kernels)."""
    import importlib
    import pkgutil

    import dsv4.kernels as package

    names = set()
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith(".kernel"):
            module = importlib.import_module(info.name)
            names |= {n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "run")}
    return sorted(names)


def ncu_command(ncu: str, report: Path, names: list[str], launches: int, bench_args: list[str]) -> list[str]:
    sections = [arg for s in SECTIONS for arg in ("--section", s)]
    # only launches inside the benchmark's timed call (DSV4_BENCH_ONCE's NVTX range): warm, not the checks
    return [ncu, "--clock-control", "none", "--target-processes", "all", "--nvtx", "--nvtx-include", f"{ONCE_RANGE}/",
            "--kernel-name", "regex:^(" + "|".join(names) + ")$", "--launch-count", str(launches), *sections,
            "-f", "-o", str(report),
            sys.executable, str(Path(__file__).with_name("bench_kernels.py")), *bench_args]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _csv_rows(text: str) -> list[list[str]]:
    """ncu's CSV, without the `==PROF==` lines it may print first."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), len(lines))
    return list(csv.reader(io.StringIO("\n".join(lines[start:]))))


def parse_details(text: str) -> dict[str, dict]:
    """Details page (one row per launch, section and metric) -> {launch id: {kernel, grid, block, columns}}."""
    rows = _csv_rows(text)
    if not rows:
        return {}
    head = {name: i for i, name in enumerate(rows[0])}
    launches: dict[str, dict] = {}
    for row in rows[1:]:
        if len(row) < len(head):
            continue
        launch = launches.setdefault(row[head["ID"]], {"kernel": row[head["Kernel Name"]],
                                                       "grid": row[head["Grid Size"]] if "Grid Size" in head else "",
                                                       "block": row[head["Block Size"]] if "Block Size" in head else ""})
        column = DETAILS.get((row[head["Section Name"]], row[head["Metric Name"]]))
        value, unit = _number(row[head["Metric Value"]]), row[head["Metric Unit"]]
        if column is None or value is None:
            continue
        scales = TIME_UNITS if column == "duration" else RATE_UNITS if column == "dram_rate" else None
        if scales is not None:  # -> us, GB/s
            if unit not in scales:
                launch.setdefault("unknown_units", []).append(f"{row[head['Metric Name']]} in {unit!r}")
                continue
            value *= scales[unit]
        launch[column] = value
    return launches


def parse_tensor_pipes(text: str) -> dict[str, float]:
    """Raw page (a header row, a units row, one row per launch) -> {launch id: the busiest tensor pipe, %}."""
    rows = _csv_rows(text)
    if len(rows) < 3:
        return {}
    head = rows[0]
    columns = [i for i, name in enumerate(head) if TENSOR_PIPE.search(name)]
    out = {}
    for row in rows[2:]:
        values = [v for i in columns if i < len(row) and (v := _number(row[i])) is not None]
        if values:
            out[row[0]] = max(values)
    return out


def summary_rows(details: dict[str, dict], pipes: dict[str, float], config: str) -> list[dict]:
    """One row per profiled launch of one benchmark configuration, in launch order (only the timed,
    warm calls are profiled; an op's variants, e.g. CSA then HCA, follow the benchmark's order)."""
    return [{"config": config, "kernel": launch["kernel"], "launch": int(launch_id), "grid": launch["grid"],
             "block": launch["block"], **{c: launch.get(c) for c in DETAILS.values()},
             "tensor_pipe_pct": pipes.get(launch_id), "unknown_units": launch.get("unknown_units", [])}
            for launch_id, launch in sorted(details.items(), key=lambda kv: int(kv[0]))]


def markdown(rows: list[dict]) -> str:
    def f(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| config | kernel | grid | µs | DRAM GB/s | DRAM % of peak | SM % | tensor pipe % | occupancy % | regs | "
             "cycles / issue |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['kernel']} | {r['grid']} | {f(r['duration'], '.1f')} | {f(r['dram_rate'], '.0f')} | "
                     f"{f(r['dram_pct'], '.1f')} | {f(r['sm_pct'], '.1f')} | {f(r['tensor_pipe_pct'], '.1f')} | "
                     f"{f(r['occupancy_pct'], '.1f')} | {f(r['registers'], '.0f')} | {f(r['cycles_per_issue'], '.1f')} |")
    return "\n".join(lines)


def profile(ncu: str, names: list[str], launches: int, config: str, bench_args: list[str]) -> list[dict]:
    """One benchmark configuration under ncu -> its summary rows."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "kernels"
        run = subprocess.run(ncu_command(ncu, report, names, launches, bench_args),
                             env={**os.environ, ONCE_ENV: "1"}, capture_output=True, text=True)
        saved = report.with_suffix(".ncu-rep")
        if run.returncode != 0 or not saved.is_file():
            raise RuntimeError(f"ncu exited {run.returncode}: {(run.stdout + run.stderr)[-3000:]}")

        def page(name: str) -> str:
            return subprocess.run([ncu, "--import", str(saved), "--csv", "--page", name],
                                  capture_output=True, text=True, check=True).stdout

        return summary_rows(parse_details(page("details")), parse_tensor_pipes(page("raw")), config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="sparse_decode,indexer_topk,sparse_prefill")
    p.add_argument("--models", default="flash")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--contexts", default="8192")
    p.add_argument("--launches", type=int, default=60, help="most kernel launches profiled (default 60)")
    p.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the ncu executable (default: ncu on PATH, or $NCU)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    ncu = shutil.which(args.ncu) or (args.ncu if Path(args.ncu).is_file() else None)
    if ncu is None:
        print(f"no ncu at {args.ncu!r} (Nsight Compute; --ncu PATH or $NCU)", file=sys.stderr)
        return 2
    names, rows = kernel_names(), []
    for op, model, batch, context in itertools.product(*(x.split(",") for x in (args.ops, args.models, args.batches,
                                                                               args.contexts))):
        config = f"{op} {model} B={batch} ctx={context}"
        print(f"profiling {config} ...", file=sys.stderr, flush=True)
        try:
            rows += profile(ncu, names, args.launches, config,
                            ["--ops", op, "--models", model, "--batches", batch, "--contexts", context])
        except RuntimeError as exc:  # the other configurations still run
            print(f"{config}: {exc}", file=sys.stderr)
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python scripts/ncu_kernels.py " + " ".join(argv or sys.argv[1:]),
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
