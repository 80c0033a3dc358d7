"""End-to-end benchmark: our engine in-process and through Triton, side by side with transformers
(eager, the same checkpoint, the same random prompts), printed as markdown for docs/PERFORMANCE.md.

Order matters for memory: the server runs first and is stopped, then both in-process models are
measured, then transformers is dropped and the longest-sequence probe gets the free memory.

Sections: TTFT by prompt length; decode step by batch and context (with transformers' at the
batches given by --hf-batches), run as the served decode runs it (a CUDA graph per batch, device
sampling) with the kernels one step launches and whether rows holding copies of one state give
bitwise-equal logits; the same on a 4-layer shape with V4-Flash's 256 routed experts, its weights
made on the GPU; Triton against in-process at one batch; the prefill -> decode handoff; KV bytes
per token against dsv4-kv-report; the longest single sequence; the batch-1 weight-read floor.
`--json` writes every figure (null where not measured) with the commit, date and GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

EPILOG = """examples:
  python scripts/bench_e2e.py --model /data/flash-mini            # the H200 run (defaults)
  python scripts/bench_e2e.py --model ~/.cache/dsv4-triton/tiny --device cpu --prompts 256,512 \\
      --batches 1,4 --contexts 256 --handoff 512 --triton-batch 2 --triton-context 256 --longest 2048 --steps 4
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (transformers naming)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--kv-format", default="auto", choices=["auto", "float", "fp8", "fp8-fp4"],
                   help="our KV pages (auto: fp8 on cuda, float on cpu)")
    p.add_argument("--prompts", default="8192,32768,131072", help="TTFT prompt lengths (tokens)")
    p.add_argument("--batches", default="1,8,32,128", help="decode batch sizes")
    p.add_argument("--contexts", default="8192,131072", help="decode contexts (tokens)")
    p.add_argument("--hf-batches", default="1,8", help="batches also run on transformers")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (median)")
    p.add_argument("--handoff", default="8192,131072", help="contexts whose handoff is measured")
    p.add_argument("--triton-batch", type=int, default=32, help="concurrent streams for Triton vs in-process")
    p.add_argument("--triton-context", type=int, default=8192, help="prompt tokens of those streams")
    p.add_argument("--triton-tokens", type=int, default=128, help="tokens each of those streams generates")
    p.add_argument("--longest", type=int, default=1048576, help="longest-sequence target (capped by the model's positions)")
    p.add_argument("--longest-fraction", type=float, default=0.85, help="share of free device memory for its KV pool")
    p.add_argument("--longest-time", type=float, default=300.0, help="seconds the probe may prefill")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth for the weight-read floor (H200: 4.8)")
    p.add_argument("--experts", type=int, default=256, help="routed experts of the in-process shape (0: skip it)")
    p.add_argument("--experts-batches", default="1,128", help="decode batches of that shape")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-longest", action="store_true", help="skip the longest-sequence probe")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds the whole run may take: transformers, the expert shape and the longest probe are "
                        "skipped (reported as not measured) when too little is left for them")
    return p


def _fmt(value, spec: str = ".1f") -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _ratio(ours, theirs) -> str:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and ours > 0:
        return f"{theirs / ours:.1f}x"
    return "-"


def _num(value, scale: float = 1.0):
    """A measured number (scaled) or None for text such as "out of memory" and NaN."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value * scale
    return None


def decode_row(model_name: str, key: tuple[int, int], r: dict, theirs) -> dict:
    batch, context = key
    return {"model": model_name, "batch": batch, "context": context, "step_ms": _num(r.get("step_ms")),
            "tokens_per_s": _num(r.get("tokens_per_s")), "rows_agree": r.get("rows_agree"),
            "transformers_step_ms": _num(theirs), "kernels_per_step": r.get("kernels_per_step"),
            "gpu_busy_graph": _num(r.get("gpu_busy_graph")), "gpu_busy_eager": _num(r.get("gpu_busy_eager"))}


def wide_experts_model(cfg, experts: int, dtype: torch.dtype, device: torch.device):
    """The benchmark model's shape with `experts` routed experts, random weights made on the device."""
    from dataclasses import replace

    from dsv4.backend.checkpoint.writer import randomize_weights
    from dsv4.backend.model.transformer import Transformer

    wide_cfg = replace(cfg, num_experts=experts)
    with torch.device(device):
        model = Transformer(wide_cfg, dtype)
    randomize_weights(model, seed=1)
    return model.eval(), f"{cfg.num_layers} layers, {experts} experts (in-process)"


def weight_read_bytes(model) -> int:
    """Bytes one batch-1 decode step must read: every weight except the unused routed experts,
    the embedding (one row) and the MTP layers."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            size = p.shape[1] * p.element_size()
        elif ".ffn.experts." in name:
            size = size * cfg.experts_per_token / cfg.num_experts
        total += size
    return int(total)


def _served_throughput(url: str, prompts: list[str], tokens: int) -> tuple[float, list[float]]:
    """Concurrent streams: (tokens/s over the window in which all were decoding, each TTFT s, sorted)."""
    from dsv4.scripts.bench_serving import stream_arrivals

    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = stream_arrivals(url, prompts[i], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise RuntimeError("a stream failed; see the server log")
    lo = max(arr[0][0] for _, arr in results)
    hi = min(arr[-1][0] for _, arr in results)
    ttfts = sorted(arr[0][0] - sent for sent, arr in results)
    counted = sum(n for _, arr in results for at, n in arr if lo < at <= hi)
    return (counted / (hi - lo) if hi > lo else float("nan")), ttfts


def _server_args(args, layout, lengths: list[int]) -> list[str]:
    longest = max(lengths) + args.triton_tokens + 16
    decode_bytes = layout.request_bytes(longest).total * max(args.triton_batch, 1) * 1.25
    prefill_bytes = layout.request_bytes(longest).total * 3
    return ["--max-model-len", str(longest), "--max-tokens-limit", str(args.triton_tokens),
            "--max-sequences", str(max(args.triton_batch, 1)), "--max-batch", str(max(args.triton_batch, 1)),
            "--kv-cache-gib", f"{decode_bytes / 2**30 + 0.25:.2f}", "--prefix-cache-gib", f"{prefill_bytes / 2**30 + 0.25:.2f}",
            "--kv-format", args.kv_format]


def measure_served(args, codec, layout) -> tuple[dict, dict, float]:
    """TTFT per prompt length and (tokens/s, median TTFT) of the concurrent streams, via Triton."""
    from dsv4.scripts.bench_serving import _stream_timings, start_server, text_prompt

    lengths = _ints(args.prompts)
    serve, url, start_s = start_server(args.model, args.device, Path("runs/bench_e2e"),
                                       _server_args(args, layout, lengths + [args.triton_context]))
    try:
        _stream_timings(url, "warm up", 4)
        ttft = {n: _stream_timings(url, f"t{n} " + text_prompt(codec, n), 2)[0] for n in lengths}
        shared = text_prompt(codec, args.triton_context)
        prompts = [f"s{i} " + shared for i in range(args.triton_batch)]  # distinct first words: no prefix hits
        throughput = _served_throughput(url, prompts, args.triton_tokens)
    finally:
        serve.terminate()
        serve.wait(180)
    ttfts = throughput[1]
    return ttft, {"tokens_per_s": throughput[0], "ttft_s": ttfts[len(ttfts) // 2], "ttfts_s": ttfts}, start_s


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()

    def time_left(needed_s: float, what: str) -> bool:
        if args.time_budget is None or args.time_budget - (time.monotonic() - started) >= needed_s:
            return True
        print(f"skipping {what}: under {needed_s:.0f} s of the time budget left", file=sys.stderr)
        return False

    from dsv4.backend.checkpoint.loader import load_model
    from dsv4.backend.kv_cache.paged_cache import layout_for
    from dsv4.backend.tokenizer import TextCodec
    from dsv4.scripts import e2e_inproc as ours
    from dsv4.scripts import e2e_transformers as hf
    from dsv4.scripts.kv_report import report

    device = torch.device(args.device)
    if args.kv_format == "auto":
        args.kv_format = "fp8" if device.type == "cuda" else "float"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    codec = TextCodec.load(args.model)
    model = load_model(args.model, device=device, dtype=dtype, progress=True)
    layout = layout_for(model.cfg, dtype, args.kv_format)
    served_ttft, served_tp, start_s = ({}, {}, float("nan"))
    if not args.no_triton:
        served_ttft, served_tp, start_s = measure_served(args, codec, layout)

    print("measuring in-process ...", file=sys.stderr)
    ours.decode_steps(model, 1, 64, 2, args.kv_format)  # warm-up: allocator, kernel compilation
    ttft, bytes_per_token, handoffs = {}, {}, {}
    handoff_lengths = _ints(args.handoff)
    for n in sorted(set(_ints(args.prompts)) | set(handoff_lengths)):
        done = ours.prefill_one(model, ours.random_prompt(n, model.cfg.vocab_size, n), 2, args.kv_format, num_rows=2)
        ttft[n] = done.seconds
        bytes_per_token[n] = ours.kv_bytes_per_token(done, n)
        if n in handoff_lengths:
            handoffs[n] = ours.handoff(done)
        del done
    def decode_or_oom(batch: int, context: int) -> dict:
        try:
            return ours.decode_steps(model, batch, context, args.steps, args.kv_format)
        except torch.cuda.OutOfMemoryError:
            return {"step_ms": "out of memory", "tokens_per_s": "out of memory", "rows_agree": None}
        finally:
            gc.collect()

    decode = {(b, c): decode_or_oom(b, c) for c in _ints(args.contexts) for b in _ints(args.batches)}
    inproc_tp = None
    if served_tp:  # the in-process side of the comparison, unless the grid above measured it
        key = (args.triton_batch, args.triton_context)
        inproc_tp = decode[key] if key in decode else decode_or_oom(*key)

    hf_ttft, hf_step = {}, {}
    if not args.no_transformers and time_left(120, "transformers"):
        print("measuring transformers ...", file=sys.stderr)
        reference = hf.load(args.model, dtype, device)
        hf_ttft = {n: hf.prefill_s(reference, n, device, seed=n) for n in _ints(args.prompts)}
        hf_step = {(b, c): hf.decode_step_ms(reference, b, c, args.steps, device)
                   for c in _ints(args.contexts) for b in _ints(args.hf_batches)}
        del reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    experts_decode, experts_name = {}, None
    if args.experts and device.type == "cuda" and time_left(60, "the expert shape"):
        print(f"measuring the {args.experts}-expert shape ...", file=sys.stderr)
        wide, experts_name = wide_experts_model(model.cfg, args.experts, dtype, device)
        context = _ints(args.contexts)[0]
        experts_decode = {(b, context): ours.decode_steps(wide, b, context, args.steps, args.kv_format)
                          for b in _ints(args.experts_batches)}
        del wide
        gc.collect()
        torch.cuda.empty_cache()

    longest = None
    if not args.no_longest and time_left(args.longest_time + 60, "the longest-sequence probe"):
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2 * 2**30
        print("longest-sequence probe ...", file=sys.stderr)
        longest = ours.longest_sequence(model, args.longest, int(free * args.longest_fraction), args.kv_format,
                                        time_limit_s=args.longest_time,
                                        progress=lambda done, total: print(f"  {done}/{total}", file=sys.stderr))

    floor_ms = weight_read_bytes(model) / (args.hbm_tbps * 1e12) * 1e3
    model_name = args.model.name
    commit = os.environ.get("DSV4_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                                                          capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"command: python scripts/bench_e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"date: {datetime.date.today()}, device: {name}, commit: {commit}, torch {torch.__version__}, "
          f"dtype {str(dtype).replace('torch.', '')}, KV {args.kv_format}\n")
    print(f"server start: {_fmt(start_s)} s\n")

    print("| prompt tokens | TTFT in-process (ms) | TTFT via Triton (ms) | transformers prefill (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for n in _ints(args.prompts):
        theirs = hf_ttft.get(n)
        theirs_ms = theirs * 1e3 if isinstance(theirs, float) else theirs
        print(f"| {n} | {ttft[n] * 1e3:.1f} | {_fmt(served_ttft[n] * 1e3 if n in served_ttft else None)} | "
              f"{_fmt(theirs_ms)} | {_ratio(ttft[n] * 1e3, theirs_ms)} |")

    print(f"\n| model | batch | context | step (ms) | tokens/s | rows bitwise equal | kernels / step | GPU busy (graph) | "
          f"transformers step (ms) | speed-up | floor at batch 1: {floor_ms:.2f} ms |")
    print("|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|")
    rows = [(model_name, k, r, hf_step.get(k)) for k, r in decode.items()]
    rows += [(experts_name, k, r, None) for k, r in experts_decode.items()]
    for name, (batch, context), r, theirs in rows:
        ratio = f"{r['step_ms'] / floor_ms:.2f}x floor" if batch == 1 and name == model_name and isinstance(r["step_ms"], float) else ""
        print(f"| {name} | {batch} | {context} | {_fmt(r['step_ms'], '.2f')} | {_fmt(r['tokens_per_s'], '.0f')} | "
              f"{ {True: 'yes', False: 'NO', None: '-'}[r['rows_agree']]} | {_fmt(r.get('kernels_per_step'), 'd')} | "
              f"{_fmt(r.get('gpu_busy_graph'), '.0%')} | {_fmt(theirs, '.2f')} | {_ratio(r['step_ms'], theirs)} | {ratio} |")

    if served_tp:
        inproc, served = inproc_tp["tokens_per_s"], served_tp["tokens_per_s"]
        share = served / inproc if isinstance(inproc, float) else None
        print(f"\nbatch {args.triton_batch} at {args.triton_context} tokens: in-process {_fmt(inproc, '.0f')} tok/s, "
              f"via Triton {_fmt(served, '.0f')} tok/s ({_fmt(share, '.2f')} of in-process); "
              f"median TTFT under that load {served_tp['ttft_s'] * 1e3:.0f} ms; first tokens at "
              + ", ".join(f"{t:.2f}" for t in served_tp["ttfts_s"]) + " s")

    print("\n| context | handoff bytes | export (ms) | import (ms) |")
    print("|---:|---:|---:|---:|")
    for n, h in handoffs.items():
        print(f"| {n} | {h['bytes']:,} | {h['export_ms']:.2f} | {h['import_ms']:.2f} |")

    print("\n| context | KV bytes/token held | dsv4-kv-report | ratio |")
    print("|---:|---:|---:|---:|")
    for n, measured in bytes_per_token.items():
        expected = report(model.cfg, n, layout.fmt, 0)["total_bytes"] / n
        print(f"| {n} | {measured:.1f} | {expected:.1f} | {measured / expected:.4f} |")

    if longest is not None:
        print(f"\nlongest single sequence: {longest['tokens']:,} tokens ({longest['stopped']}), prefill "
              f"{longest['prefill_s']:.1f} s, decode step there {_fmt(longest['decode_step_ms'], '.2f')} ms, "
              f"KV held {longest['kv_bytes'] / 2**20:,.1f} MiB")
    if args.json is not None:
        report = {
            "commit": commit, "date": str(datetime.date.today()), "gpu": name, "model": model_name,
            "command": "python scripts/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "kv_format": args.kv_format,
            "weight_read_floor_ms": floor_ms, "server_start_s": _num(start_s),
            "decode": [decode_row(n, k, r, theirs) for n, k, r, theirs in rows]
                      + ([decode_row(model_name, (1, longest["tokens"]), {"step_ms": longest["decode_step_ms"]}, None)]
                         if longest is not None else []),
            "ttft": [{"prompt_tokens": n, "inproc_ms": ttft[n] * 1e3,
                      "triton_ms": served_ttft[n] * 1e3 if n in served_ttft else None,
                      "transformers_ms": _num(hf_ttft.get(n), 1e3)} for n in _ints(args.prompts)],
            "served": [{"streams": args.triton_batch, "prompt_tokens": args.triton_context,
                        "inproc_tok_s": _num(inproc_tp["tokens_per_s"]) if inproc_tp else None,
                        "triton_tok_s": _num(served_tp["tokens_per_s"]),
                        "median_ttft_ms": _num(served_tp["ttft_s"], 1e3),
                        "ttfts_ms": [_num(t, 1e3) for t in served_tp["ttfts_s"]]}] if served_tp else [],
            "handoff": [{"context": n, **h} for n, h in handoffs.items()],
            "longest": longest,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
