"""Decode-step benchmark of our engine alone, as the served decode runs it (persistent rows, device
sampling, one CUDA graph per batch): step time, tokens/s, kernels per step, GPU busy share, and
whether rows holding copies of one state give bitwise-equal logits. Weights come from a checkpoint
(`--model`) or are made on the device for a preset (`--preset`, optionally with `--experts`), so
shapes too large to write (V4-Flash's 256 experts on 4 layers) cost no disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from dsv4.kernels.benchmarking import commit_name

EPILOG = """examples:
  python scripts/bench_decode.py --preset flash-mini --batches 1,8,32,128 --contexts 8192
  python scripts/bench_decode.py --preset flash-mini --experts 256 --batches 1,128 --json runs/decode256.json
  python scripts/bench_decode.py --model ~/.cache/dsv4-triton/tiny --device cpu --batches 1,2 --contexts 256 --steps 3
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_model(args, device: torch.device, dtype: torch.dtype):
    from dsv4.backend import presets
    from dsv4.backend.checkpoint.loader import load_model
    from dsv4.backend.checkpoint.writer import randomize_weights
    from dsv4.backend.model.transformer import Transformer

    if args.model is not None:
        return load_model(args.model, dtype=dtype, device=device), args.model.name
    cfg = presets.preset(args.preset)
    name = args.preset
    if args.experts:
        cfg, name = replace(cfg, num_experts=args.experts), f"{args.preset}, {args.experts} experts"
    with torch.device(device):
        model = Transformer(cfg, dtype)
    return randomize_weights(model, seed=args.seed).eval(), f"{name} (random weights made on the device)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=None, help="checkpoint directory")
    src.add_argument("--preset", default="flash-mini", help="preset shape with random weights (default flash-mini)")
    p.add_argument("--experts", type=int, default=0, help="routed experts instead of the preset's")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--kv-format", default="auto", choices=["auto", "float", "fp8", "fp8-fp4"])
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--contexts", default="8192")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (median)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager steps (for comparison)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--kernel-table", type=Path, default=None,
                   help="write the kernels of one eager step at the first batch (name, calls, us), slowest first")
    args = p.parse_args(argv)
    from dsv4.scripts import e2e_inproc as ours

    device = torch.device(args.device)
    if args.kv_format == "auto":
        args.kv_format = "fp8" if device.type == "cuda" else "float"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, name = build_model(args, device, dtype)
    rows, table = [], []
    for context in _ints(args.contexts):
        for batch in _ints(args.batches):
            try:
                r = ours.decode_steps(model, batch, context, args.steps, args.kv_format, cuda_graphs=not args.no_cuda_graphs,
                                      kernel_table=table if not rows else None)
            except torch.cuda.OutOfMemoryError:
                r = {"step_ms": None, "tokens_per_s": None, "rows_agree": None, "kernels_per_step": None}
            rows.append({"batch": batch, "context": context, **r})
            print(f"  batch {batch} context {context}: {r['step_ms']} ms", file=sys.stderr)
    commit = commit_name()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"command: python scripts/bench_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"date: {datetime.date.today()}, device: {gpu}, commit: {commit}, torch {torch.__version__}, model: {name}, "
          f"KV {args.kv_format}, CUDA graphs {'off' if args.no_cuda_graphs else 'on'}\n")
    print("| batch | context | step (ms) | graph replay (ms) | tokens/s | rows bitwise equal | kernels / step | "
          "GPU busy eager | GPU busy graph |")
    print("|---:|---:|---:|---:|---:|:---:|---:|---:|---:|")

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {f(r['step_ms'], '.3f')} | {f(r.get('graph_ms'), '.3f')} | "
              f"{f(r['tokens_per_s'], '.0f')} | "
              f"{ {True: 'yes', False: 'NO', None: '-'}[r['rows_agree']]} | {f(r.get('kernels_per_step'), 'd')} | "
              f"{f(r.get('gpu_busy_eager'), '.0%')} | {f(r.get('gpu_busy_graph'), '.0%')} |")
    if args.kernel_table is not None and table:
        args.kernel_table.parent.mkdir(parents=True, exist_ok=True)
        total = sum(t for _, _, t in table)
        lines = [f"{t:10.1f} us {100 * t / total:5.1f}% {c:4d}x  {n[:150]}" for n, c, t in table]
        args.kernel_table.write_text(f"one eager decode step, {sum(c for _, c, _ in table)} kernels, {total:.1f} us\n"
                                     + "\n".join(lines) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"commit": commit, "date": str(datetime.date.today()), "gpu": gpu, "model": name,
                                         "kv_format": args.kv_format, "cuda_graphs": not args.no_cuda_graphs,
                                         "decode": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
