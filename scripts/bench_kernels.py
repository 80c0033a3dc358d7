"""dsv4-bench-kernels: time every Triton kernel at V4-Flash / V4-Pro shapes on one GPU, after checking it.

Measures the GPU's copy bandwidth and bf16 matmul rate first, then for every op and shape: builds random
inputs, compares the kernel with its float32 reference (and the plain-PyTorch baseline) and only then
times both. Prints one markdown table; `--out FILE` appends it (with the command line) to FILE.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import traceback
from collections.abc import Callable

OPS = ("kv_format", "sparse_decode", "indexer_topk", "compressor", "sparse_prefill", "compressor_prefill")
DECODE_OPS = ("sparse_decode", "indexer_topk")  # every (model, batch, context)
CONTEXT_FREE_OPS = ("kv_format", "compressor")  # every (model, batch), first context only
PREFILL_OPS = ("sparse_prefill", "compressor_prefill")  # one request: every (model, context)

EXAMPLES = """\
examples:
  python scripts/bench_kernels.py                                  # everything, print the table
  python scripts/bench_kernels.py --ops sparse_decode --models flash --batches 1,64 --contexts 8192
  python scripts/bench_kernels.py --out docs/PERFORMANCE.md        # append the table to a results file
"""


def _int_list(text: str) -> list[int]:
    vals = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        elif part.endswith("m"):
            part, mult = part[:-1], 1 << 20
        vals.append(int(part) * mult)
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_kernels",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of ops (default: all of {', '.join(OPS)})")
    p.add_argument("--models", default="flash,pro", help="comma list of model shapes: flash (H 64, top-k 512), pro (H 128, top-k 1024)")
    p.add_argument("--batches", type=_int_list, default=[1, 16, 64, 128], help="decode batch sizes (default 1,16,64,128)")
    p.add_argument("--contexts", type=_int_list, default=[8192, 131072, 1048576],
                   help="context lengths, suffixes k/m allowed (default 8k,128k,1m)")
    p.add_argument("--prefill-queries", type=int, default=1024, help="query tokens of the sparse-prefill chunk (default 1024)")
    p.add_argument("--out", default=None, help="append the markdown table to this file (e.g. docs/PERFORMANCE.md)")
    p.add_argument("--json", default=None, help="also write the rows, ceilings, commit, date and GPU to this JSON file "
                                                 "(e.g. docs/bench/h200_kernels.json)")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and exit (no GPU needed)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the table of ops, time launch-config and split-plan variants of sparse_decode (CSA "
                        "and HCA) and launch variants of indexer_topk (FP8, FP4) at every --models x --batches x --contexts")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {', '.join(OPS)}")
    from dsv4.kernels.benchmarking import MODELS

    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    return args


@dataclasses.dataclass(frozen=True)
class Run:
    op: str
    model: str
    batch: int
    context: int

    def label(self) -> str:
        return f"{self.op} {self.model} B={self.batch} ctx={self.context}"


def plan(args: argparse.Namespace) -> list[Run]:
    """Every (op, model, batch, context) the arguments ask for, each op at the axes it depends on."""
    runs = []
    for op in args.ops:
        for model in args.models:
            if op in DECODE_OPS:
                runs += [Run(op, model, b, c) for b in args.batches for c in args.contexts]
            elif op in CONTEXT_FREE_OPS:
                runs += [Run(op, model, b, args.contexts[0]) for b in args.batches]
            else:
                runs += [Run(op, model, 1, c) for c in args.contexts]
    return runs


def _bench_fn(op: str) -> Callable:
    if op == "kv_format":
        from dsv4.kernels.kv_format.bench import bench
    elif op == "sparse_decode":
        from dsv4.kernels.sparse_decode.bench import bench
    elif op == "indexer_topk":
        from dsv4.kernels.indexer_topk.bench import bench
    elif op == "compressor":
        from dsv4.kernels.compressor.bench import bench
    elif op == "sparse_prefill":
        from dsv4.kernels.sparse_prefill.bench import bench as prefill

        return lambda model, batch, context, s_len=1024: prefill(model, context, s_len)
    else:
        from dsv4.kernels.compressor.bench import bench_prefill

        return lambda model, batch, context, s_len=1024: bench_prefill(model, context)
    return lambda model, batch, context, s_len=1024: bench(model, batch, context)


def execute(run: Run, args: argparse.Namespace) -> list:
    import torch

    from dsv4.kernels.benchmarking import MODELS, BenchRow, CheckFailed, skipped

    model = MODELS[run.model]
    cfg = f"{model.name} B={run.batch} ctx={run.context}"
    try:
        return _bench_fn(run.op)(model, run.batch, run.context, args.prefill_queries)
    except CheckFailed as e:
        return [BenchRow(run.op, cfg, None, note=f"FAILED check, not timed: {e}")]
    except torch.cuda.OutOfMemoryError:
        return [skipped(run.op, cfg, "out of GPU memory")]
    finally:
        torch.cuda.empty_cache()


def sweep_rows(args: argparse.Namespace) -> list:
    from dsv4.kernels.benchmarking import MODELS
    from dsv4.kernels.indexer_topk.bench import sweep as indexer_sweep
    from dsv4.kernels.sparse_decode.bench import sweep as decode_sweep

    rows = []
    for name in args.models:
        for b in args.batches:
            for c in args.contexts:
                for got in (decode_sweep(MODELS[name], b, c, "csa"), decode_sweep(MODELS[name], b, c, "hca"),
                            indexer_sweep(MODELS[name], b, c), indexer_sweep(MODELS[name], b, c, "fp4")):
                    _print_rows(got)
                    rows += got
    return rows


def _print_rows(rows: list) -> None:
    for r in rows:
        us = "-" if r.us is None else f"{r.us:.1f} us"
        print(f"{r.op:28s} {r.config:60s} {us:>12s}  {r.note}", flush=True)


def header(meta: dict, ceil) -> str:
    lines = [
        f"### Kernel benchmark, {meta['date']}",
        "",
        f"- GPU: {ceil.device_name}; torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
        f"- measured ceilings: copy {ceil.hbm_gbps:.0f} GB/s (read + write), bf16 matmul {ceil.bf16_tflops:.0f} TFLOP/s",
        "- roofline = max(bytes / copy bandwidth, FLOPs / bf16 rate) over the measured time; "
        "torch ref = plain-PyTorch implementation of the same op",
        "- µs: median of CUDA-graph replays for the decode-step ops (device time, no Python launch overhead; "
        "the torch ref too where it can be captured), triton do_bench for the prefill ops",
        f"- command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


def _meta(argv: list[str] | None) -> dict:
    import torch
    import triton

    from dsv4.kernels.benchmarking import commit_name

    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        torch=torch.__version__, triton=triton.__version__, commit=commit_name(),
        command="python scripts/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        host=platform.node(),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        for r in runs:
            print(r.label())
        print(f"{len(runs)} runs")
        return 0
    import torch

    from dsv4.kernels.benchmarking import markdown_table, measure_ceilings

    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil.hbm_gbps:.0f} GB/s, bf16 {ceil.bf16_tflops:.0f} TFLOP/s on {ceil.device_name}", flush=True)
    rows = []
    if args.sweep:
        runs = []
        rows = sweep_rows(args)
    for run in runs:
        try:
            got = execute(run, args)
        except Exception as e:  # noqa: BLE001 - one broken op must not hide the others' numbers
            traceback.print_exc()
            from dsv4.kernels.benchmarking import BenchRow

            got = [BenchRow(run.op, run.label(), None, note=f"error: {type(e).__name__}: {e}"[:200])]
        _print_rows(got)
        rows += got
    meta = _meta(argv)
    report = header(meta, ceil) + markdown_table(rows, ceil) + "\n"
    print()
    print(report)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(json_report(meta, ceil, rows), f, indent=1)
            f.write("\n")
    return 0


def json_report(meta: dict, ceil, rows: list) -> dict:
    """The run as JSON: commit, date, GPU, the measured ceilings and one object per row (None: not measured)."""
    def number(value):
        return None if value is None or value != value else round(value, 3)  # NaN: not measured

    return {**meta, "gpu": ceil.device_name, "ceilings": {"copy_gbps": ceil.hbm_gbps, "bf16_tflops": ceil.bf16_tflops},
            "rows": [{"op": r.op, "config": r.config, "us": number(r.us), "gbps": number(r.gbps()),
                      "tflops": number(r.tflops()), "roofline": number(r.roofline(ceil)), "ref_us": number(r.ref_us),
                      "note": r.note} for r in rows]}


if __name__ == "__main__":
    sys.exit(main())
