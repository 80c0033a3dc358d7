"""End-to-end benchmark: our engine in-process and through Triton, side by side with transformers
(eager, the same checkpoint, the same random prompts), printed as markdown for docs/PERFORMANCE.md.

Order matters for memory: the server runs first and is stopped, then both in-process models are
measured, then transformers is dropped and the longest-sequence probe gets the free memory.

Sections: TTFT by prompt length; decode step by batch and context (with transformers' at the
batches given by --hf-batches), run as the served decode runs it (a CUDA graph per batch, device
sampling) with the kernels one step launches and whether rows holding copies of one state give
bitwise-equal logits; the same on a 4-layer shape with V4-Flash's 256 routed experts, its weights
made on the GPU; served against in-process (scripts/e2e_served.py): the first request after start,
each --served-streams configuration (also run through the served engines in this process, without
Triton, so that the two differ only by Triton's path), one --served-long prompt and the running
streams' inter-token latency while an --itl-long prompt prefills; the prefill -> decode handoff; KV bytes per token
against dsv4-kv-report; the longest single sequence; the batch-1 weight-read floor.
`--json` writes every figure (null where not measured) with the commit, date and GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
from dsv4.kernels.benchmarking import commit_name
from dsv4.scripts import e2e_served

EPILOG = """examples:
  python scripts/bench_e2e.py --model /data/flash-mini            # the H200 run (defaults)
  python scripts/bench_e2e.py --model /data/flash-mini --prompts 8192,32768 --served-long 1000000 \\
      --longest 1000000 --itl-long 131072     # every served row, the long ones too
  python scripts/bench_e2e.py --model ~/.cache/dsv4-triton/tiny --device cpu --prompts 256,512 \\
      --batches 1,4 --contexts 256 --handoff 512 --served-streams 2x256,3x128 --served-tokens 8 \\
      --served-long 2048 --itl-long 1024 --longest 2048 --steps 4 --no-transformers
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _streams(text: str) -> list[tuple[int, int, int | None]]:
    """"8x2048,32x2048x512" -> [(8, 2048, None), (32, 2048, 512)]: streams x prompt tokens [x tokens out;
    None: --served-tokens]."""
    configs = []
    for item in filter(None, text.split(",")):
        parts = item.split("x")
        if not (len(parts) in (2, 3) and all(p.isdigit() and int(p) > 0 for p in parts) and int(parts[1]) > 1):
            raise argparse.ArgumentTypeError(f"{item!r} is not STREAMSxPROMPT_TOKENS[xTOKENS_OUT], e.g. 8x2048")
        configs.append((int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return configs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (transformers naming)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--kv-format", default="auto", choices=["auto", "float", "fp8", "fp8-fp4"],
                   help="our KV pages (auto: fp8 on cuda, float on cpu)")
    p.add_argument("--prompts", type=_ints, default="8192,32768,131072",
                   help="TTFT prompt lengths (tokens); the first also times the first request after start")
    p.add_argument("--batches", type=_ints, default="1,8,32,128", help="decode batch sizes")
    p.add_argument("--contexts", type=_ints, default="8192,131072", help="decode contexts (tokens)")
    p.add_argument("--hf-batches", type=_ints, default="1,8", help="batches also run on transformers")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (median)")
    p.add_argument("--handoff", type=_ints, default="8192,131072", help="contexts whose handoff is measured")
    p.add_argument("--served-streams", type=_streams, default="8x2048,32x8192",
                   help="concurrent Triton streams, STREAMSxPROMPT_TOKENS[xTOKENS_OUT] (comma list), each against "
                        "in-process decode at that batch and context")
    p.add_argument("--served-tokens", type=int, default=48,
                   help="tokens each of those streams generates, where a configuration does not say")
    p.add_argument("--served-long", type=int, default=0,
                   help=f"one prompt of this many tokens via Triton ({e2e_served.LONG_TOKENS_OUT} tokens out) against "
                        "in-process prefill and decode at that context; the longest-sequence probe is that in-process "
                        "side when --longest equals it (0: skip)")
    p.add_argument("--itl-long", type=int, default=0,
                   help=f"inter-token latency of {e2e_served.ITL_STREAMS} running streams while a prompt of this many "
                        "tokens prefills, against theirs before it (0: skip)")
    p.add_argument("--longest", type=int, default=1048576, help="longest-sequence target (capped by the model's positions)")
    p.add_argument("--longest-fraction", type=float, default=0.85, help="share of free device memory for its KV pool")
    p.add_argument("--longest-time", type=float, default=300.0, help="seconds the probe may prefill")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth for the weight-read floor (H200: 4.8)")
    p.add_argument("--experts", type=int, default=256, help="routed experts of the in-process shape (0: skip it)")
    p.add_argument("--experts-batches", type=_ints, default="1,128", help="decode batches of that shape")
    p.add_argument("--stage-layout", choices=["colocated", "split"], default="colocated",
                   help="dsv4-serve's --stage-layout for the served half (default colocated, dsv4-serve's on cuda)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more dsv4-serve flag for the served half, e.g. "
                        "--serve-arg=--prefill-token-budget=8192 (repeatable)")
    p.add_argument("--no-engines", action="store_true",
                   help="skip running each --served-streams configuration through the served engines in this process")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-longest", action="store_true", help="skip the longest-sequence probe")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds the whole run may take: transformers, the expert shape, the longest probe and the "
                        "--served-long / --itl-long parts are skipped (reported as not measured) when too little is "
                        "left for them")
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


def _unit(value, unit: str, spec: str = ".1f") -> str:
    """A figure with its unit, or "-" where it was not measured."""
    return "-" if value is None else f"{value:{spec}} {unit}"


def _against(value_ms, steady_ms) -> str:
    if value_ms is None:
        return "-"
    share = f" ({value_ms / steady_ms:.1f}x steady)" if steady_ms else ""
    return f"{value_ms:.1f} ms{share}"


def _streams_triton(r: dict) -> str:
    if r["triton_tok_s"] is None:
        return "-"
    window = r["triton_all_decoding_tok_s"]
    together = (f"all {r['streams']} decoding: {window:.0f} tok/s for {r['all_decoding_s']:.2f} s"
                if window is not None else "never all decoding at once")
    return (f"{r['triton_tok_s']:.0f} tok/s ({_fmt(r['ratio'], '.2f')}x in-process; {together}), "
            f"median TTFT {_unit(r['median_ttft_ms'], 'ms', '.0f')}")


def _long_inproc(long: dict) -> str:
    if long["inproc_prefill_s"] is None:
        return "-"
    short = long["inproc_tokens"] < long["prompt_tokens"]
    reached = f" ({long['inproc_tokens']:,} tokens: {long['inproc_stopped']})" if short else ""
    step = _unit(long["inproc_decode_step_ms"], "ms", ".2f")
    return f"prefill {long['inproc_prefill_s']:.1f} s{reached}, step {step}"


def _long_triton(long: dict) -> str:
    if long["triton_ttft_ms"] is None:
        return "-"
    return f"TTFT {long['triton_ttft_ms'] / 1e3:.1f} s, {_unit(long['triton_decode_ms_per_token'], 'ms/token', '.2f')}"


def _itl_triton(itl: dict | None) -> str:
    if itl is None:
        return "-"
    return (f"{_unit(itl['during_p99_ms'], 'ms')} against {_unit(itl['baseline_p99_ms'], 'ms')} "
            f"({_fmt(itl['ratio_p99'], '.2f')}x)")


def _path_costs(server: dict) -> str:
    """What the response path did during one configuration, from the server's counters."""
    guard = server["models"].get("stream_guard", {})
    return (f"server side: {server['vllm:generation_tokens_total']:.0f} tokens in {server['dsv4_decode_responses_total']:.0f} "
            f"responses over {server['dsv4_decode_steps_total']:.0f} decode steps; stream_guard "
            f"{guard.get('requests', 0):.0f} chunks, queue {_fmt(guard.get('queue_us_per_request'), '.0f')} µs and "
            f"execute {_fmt(guard.get('compute_us_per_request'), '.0f')} µs per chunk")


def served_rows(args, served: dict, stream_decode: dict, engines: dict) -> list[dict]:
    """One entry per --served-streams configuration: via Triton against in-process decode at that
    batch, and against the same streams through the served engines in this process."""
    rows = []
    for streams, context, tokens in args.served_streams:
        got = served["streams"].get((streams, context, tokens), {})
        triton, inproc = _num(got.get("tokens_per_s")), _num(stream_decode[(streams, context)]["tokens_per_s"])
        engine = engines.get((streams, context, tokens), {})
        engine_tok_s = _num(engine.get("tokens_per_s"))
        rows.append({"streams": streams, "prompt_tokens": context, "tokens": tokens,
                     "triton_tok_s": triton, "inproc_tok_s": inproc,
                     "ratio": triton / inproc if triton is not None and inproc else None,
                     "engines_tok_s": engine_tok_s,
                     "engines_all_decoding_tok_s": _num(engine.get("all_decoding_tokens_per_s")),
                     "engines_median_ttft_ms": _num(engine.get("ttft_s"), 1e3),
                     "engines_ttfts_ms": [_num(t, 1e3) for t in engine.get("ttfts_s", [])],
                     "engines_error": engine.get("error"),
                     "ratio_engines": triton / engine_tok_s if triton is not None and engine_tok_s else None,
                     "triton_all_decoding_tok_s": _num(got.get("all_decoding_tokens_per_s")),
                     "all_decoding_s": _num(got.get("all_decoding_s")),
                     "median_ttft_ms": _num(got.get("ttft_s"), 1e3),
                     "ttfts_ms": [_num(t, 1e3) for t in got.get("ttfts_s", [])],
                     "server": got.get("server")})
    return rows


def long_row(args, served: dict, inproc: dict | None) -> dict | None:
    """The --served-long prompt via Triton against in-process prefill and the decode step there."""
    if not args.served_long:
        return None
    got, inproc = served["long"] or {}, inproc or {}
    return {"prompt_tokens": args.served_long, "tokens_out": e2e_served.LONG_TOKENS_OUT,
            "triton_ttft_ms": _num(got.get("ttft_s"), 1e3),
            "triton_decode_ms_per_token": _num(got.get("decode_ms_per_token")),
            # the probe may stop short of the prompt (time limit, memory): its prefill covers inproc_tokens
            "inproc_prefill_s": _num(inproc.get("prefill_s")),
            "inproc_decode_step_ms": _num(inproc.get("decode_step_ms")),
            "inproc_tokens": inproc.get("tokens"), "inproc_stopped": inproc.get("stopped")}


def print_served_table(args, served: dict, ttft_ms: dict, inproc_first_ms: float, streams: list[dict],
                       long: dict | None) -> None:
    """Served against in-process, a row per figure, then each stream's first-token time."""
    triton_ttft_ms = {n: _num(s, 1e3) for n, s in served["ttft"].items()}
    print("| figure | in-process | via Triton |")
    print("|---|---:|---:|")
    for n in args.prompts:
        print(f"| TTFT, {n:,}-token prompt (steady) | {ttft_ms[n]:.1f} ms | {_unit(triton_ttft_ms.get(n), 'ms')} |")
    first = args.prompts[0]
    print(f"| first request after start, {first:,}-token prompt | {_against(inproc_first_ms, ttft_ms[first])} | "
          f"{_against(_num(served['first_request_s'], 1e3), triton_ttft_ms.get(first))} |")
    for r in streams:
        print(f"| {r['streams']} concurrent {r['prompt_tokens']:,}-token streams, {r['tokens']} tokens each: "
              f"tok/s, median TTFT | {_unit(r['inproc_tok_s'], 'tok/s', '.0f')} (decode at batch {r['streams']}) | "
              f"{_streams_triton(r)} |")
    if long is not None:
        print(f"| one {long['prompt_tokens']:,}-token prompt, {long['tokens_out']} tokens out: TTFT, decode "
              f"ms/token | {_long_inproc(long)} | {_long_triton(long)} |")
    itl = served["itl"]
    if args.itl_long:
        print(f"| ITL p99 of {e2e_served.ITL_STREAMS} running streams while a {args.itl_long:,}-token prompt "
              f"prefills, against before it (target <= 1.5x) | - | {_itl_triton(itl)} |")
    for r in streams:
        _print_first_tokens(r, r["ttfts_ms"], "")
        if r.get("server"):
            print(_path_costs(r["server"]))
    if itl:
        ms = {k: _unit(v, "ms", ".2f") for k, v in itl.items() if k.endswith("_ms")}
        print(f"\nITL of {itl['streams']} streams ({itl['stream_prompt_tokens']:,}-token prompts): before the long "
              f"prompt p50 {ms['baseline_p50_ms']}, p99 {ms['baseline_p99_ms']} ({itl['baseline_gaps']} gaps); "
              f"while it prefilled ({itl['prefill_ttft_ms'] / 1e3:.2f} s to its first token) "
              f"p50 {ms['during_p50_ms']}, p99 {ms['during_p99_ms']} ({itl['during_gaps']} gaps)"
              + ("" if itl["streams_outlasted_prefill"] else "; a stream ended before the prefill did"))
    for what, error in served["errors"].items():
        print(f"\n{what} via Triton failed: {error}")
    print_engines_table(streams)


def print_engines_table(streams: list[dict]) -> None:
    """Each stream configuration through the served engines in this process against via Triton: the
    same scheduler on both sides, so the ratio is what Triton's path costs (the in-process engines are
    colocated, as dsv4-serve runs them on cuda; on a CPU it splits the stages into two processes)."""
    if not any(r["engines_tok_s"] is not None or r["engines_error"] for r in streams):
        return
    print("\n| streams | in-process engines (colocated): tok/s (all decoding), median TTFT | via Triton: tok/s (all decoding), "
          "median TTFT | Triton / engines |")
    print("|---|---:|---:|---:|")
    for r in streams:
        engines = (r["engines_error"] or f"{_unit(r['engines_tok_s'], 'tok/s', '.0f')} "
                   f"({_unit(r['engines_all_decoding_tok_s'], 'tok/s', '.0f')}), {_unit(r['engines_median_ttft_ms'], 'ms', '.0f')}")
        triton = (f"{_unit(r['triton_tok_s'], 'tok/s', '.0f')} ({_unit(r['triton_all_decoding_tok_s'], 'tok/s', '.0f')}), "
                  f"{_unit(r['median_ttft_ms'], 'ms', '.0f')}")
        print(f"| {r['streams']} x {r['prompt_tokens']:,} x {r['tokens']} | {engines} | {triton} | "
              f"{_fmt(r['ratio_engines'], '.2f')}x |")
    for r in streams:
        _print_first_tokens(r, r["engines_ttfts_ms"], " in-process")


def _print_first_tokens(r: dict, ttfts_ms: list, where: str) -> None:
    """Each stream's first-token time of one configuration (s), when it was measured."""
    if ttfts_ms:
        print(f"\n{r['streams']} x {r['prompt_tokens']:,} tokens{where}: first tokens at "
              + ", ".join(f"{t / 1e3:.2f}" for t in ttfts_ms) + " s")


def engine_streams(args, model, codec, layout, time_left) -> dict:
    """Each --served-streams configuration through the served engines in this process, with the
    prefill settings dsv4-serve resolves from --device and --serve-arg."""
    from dsv4.scripts import e2e_inproc as ours
    from dsv4.scripts import serve

    settings = serve.parse_args(["--device", args.device, *args.serve_arg])
    serve.device_defaults(settings)
    out = {}
    for streams, context, tokens in args.served_streams:
        if not time_left(30, f"{streams} x {context} streams through the in-process engines"):
            continue
        print(f"in-process engines: {streams} x {context} tokens, {tokens} out ...", file=sys.stderr)
        # the prefill pool holds the prompts of a full pass and the prefix cache's copies beside them
        prefill_gib = (settings.prefill_max_prompts + 2) * layout.request_bytes(context + 64).total / 2**30 + 0.25
        try:
            out[(streams, context, tokens)] = ours.engine_streams(
                model, codec, streams, context, tokens, settings.prefill_chunk, settings.prefill_token_budget,
                settings.prefill_max_prompts, prefill_gib, args.kv_format)
        except Exception as exc:  # noqa: BLE001 - out of memory, a request error, a time-out: reported, the rest runs
            out[(streams, context, tokens)] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        finally:
            gc.collect()
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.served_streams = [(s, c, t or args.served_tokens) for s, c, t in args.served_streams]
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
    served = e2e_served.not_measured() if args.no_triton else e2e_served.measure(args, codec, layout, time_left)

    print("measuring in-process ...", file=sys.stderr)
    vocab = model.cfg.vocab_size
    # the first prefill after loading, before any warm-up: the in-process side of the first request after start
    first = args.prompts[0]
    inproc_first_s = ours.prefill_one(model, ours.random_prompt(first, vocab, first + 1), 2, args.kv_format).seconds
    ours.decode_steps(model, 1, 64, 2, args.kv_format)  # warm-up: allocator, kernel compilation
    ttft, bytes_per_token, handoffs = {}, {}, {}
    for n in sorted(set(args.prompts) | set(args.handoff)):
        done = ours.prefill_one(model, ours.random_prompt(n, vocab, n), 2, args.kv_format, num_rows=2)
        ttft[n] = done.seconds
        bytes_per_token[n] = ours.kv_bytes_per_token(done, n)
        if n in args.handoff:
            handoffs[n] = ours.handoff(done)
        del done
    def decode_or_oom(batch: int, context: int) -> dict:
        try:
            return ours.decode_steps(model, batch, context, args.steps, args.kv_format)
        except torch.cuda.OutOfMemoryError:
            return {"step_ms": "out of memory", "tokens_per_s": "out of memory", "rows_agree": None}
        finally:
            gc.collect()

    decode = {(b, c): decode_or_oom(b, c) for c in args.contexts for b in args.batches}
    # the in-process side of each served configuration, unless the grid above measured it
    stream_decode = {(b, c): decode[(b, c)] if (b, c) in decode else decode_or_oom(b, c) for b, c, _ in args.served_streams}
    engines = {} if args.no_engines else engine_streams(args, model, codec, layout, time_left)

    hf_ttft, hf_step = {}, {}
    if not args.no_transformers and time_left(120, "transformers"):
        print("measuring transformers ...", file=sys.stderr)
        reference = hf.load(args.model, dtype, device)
        hf_ttft = {n: hf.prefill_s(reference, n, device, seed=n) for n in args.prompts}
        hf_step = {(b, c): hf.decode_step_ms(reference, b, c, args.steps, device)
                   for c in args.contexts for b in args.hf_batches}
        del reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    experts_decode, experts_name = {}, None
    if args.experts and device.type == "cuda" and time_left(60, "the expert shape"):
        print(f"measuring the {args.experts}-expert shape ...", file=sys.stderr)
        wide, experts_name = wide_experts_model(model.cfg, args.experts, dtype, device)
        context = args.contexts[0]
        experts_decode = {(b, context): ours.decode_steps(wide, b, context, args.steps, args.kv_format)
                          for b in args.experts_batches}
        del wide
        gc.collect()
        torch.cuda.empty_cache()

    def single_sequence(target: int) -> dict:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2 * 2**30
        print(f"single-sequence probe towards {target:,} tokens ...", file=sys.stderr)
        return ours.longest_sequence(model, target, int(free * args.longest_fraction), args.kv_format,
                                     time_limit_s=args.longest_time,
                                     progress=lambda done, total: print(f"  {done}/{total}", file=sys.stderr))

    longest = None
    if not args.no_longest and time_left(args.longest_time + 60, "the longest-sequence probe"):
        longest = single_sequence(args.longest)
    long_inproc = None  # the in-process side of --served-long: the same probe at that length
    if args.served_long:
        if longest is not None and args.longest == args.served_long:
            long_inproc = longest
        elif time_left(args.longest_time + 60, "the in-process long prompt"):
            long_inproc = single_sequence(args.served_long)

    floor_ms = weight_read_bytes(model) / (args.hbm_tbps * 1e12) * 1e3
    model_name = args.model.name
    commit = commit_name()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"command: python scripts/bench_e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"date: {datetime.date.today()}, device: {name}, commit: {commit}, torch {torch.__version__}, "
          f"dtype {str(dtype).replace('torch.', '')}, KV {args.kv_format}\n")
    print(f"server start: {_fmt(served['start_s'])} s" + (f"; GPU memory: {served['gpu_memory']}" if served["gpu_memory"] else "") + "\n")

    served_ttft = served["ttft"]
    print("| prompt tokens | TTFT in-process (ms) | TTFT via Triton (ms) | transformers prefill (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.prompts:
        theirs = hf_ttft.get(n)
        theirs_ms = theirs * 1e3 if isinstance(theirs, float) else theirs
        print(f"| {n} | {ttft[n] * 1e3:.1f} | {_fmt(_num(served_ttft.get(n), 1e3))} | "
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

    stream_rows = served_rows(args, served, stream_decode, engines)
    long = long_row(args, served, long_inproc)
    print()
    print_served_table(args, served, {n: s * 1e3 for n, s in ttft.items()}, inproc_first_s * 1e3, stream_rows, long)

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
            "weight_read_floor_ms": floor_ms, "stage_layout": args.stage_layout, "serve_args": args.serve_arg,
            "server_start_s": _num(served["start_s"]),
            "server_gpu_memory": served["gpu_memory"],
            "decode": [decode_row(n, k, r, theirs) for n, k, r, theirs in rows]
                      + ([decode_row(model_name, (1, longest["tokens"]), {"step_ms": longest["decode_step_ms"]}, None)]
                         if longest is not None else []),
            "ttft": [{"prompt_tokens": n, "inproc_ms": ttft[n] * 1e3, "triton_ms": _num(served_ttft.get(n), 1e3),
                      "transformers_ms": _num(hf_ttft.get(n), 1e3),
                      # the first request after start (Triton) / first prefill after loading (in-process)
                      "first_request_ms": _num(served["first_request_s"], 1e3) if n == first else None,
                      "inproc_first_ms": inproc_first_s * 1e3 if n == first else None} for n in args.prompts],
            "served": stream_rows,
            "long_prompt": long,
            "itl_during_prefill": served["itl"],
            "served_errors": served["errors"],
            "handoff": [{"context": n, **h} for n, h in handoffs.items()],
            "longest": longest,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
