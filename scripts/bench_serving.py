"""Serving benchmark: the same requests in-process (dsv4-generate's path) and through Triton.

Starts dsv4-serve on free loopback ports (its start-up time is measured too), then for each
prompt length: TTFT (median over --repeats streams) and single-stream decode tokens/s over the
gRPC stream, next to in-process prefill and decode on the same machine. Prints a markdown table
with the command, date and machine for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

EPILOG = """example:
  python scripts/bench_serving.py --model ~/.cache/dsv4-triton/tiny --prompt-tokens 16,512,2048 --max-tokens 128
"""


def stream_arrivals(url: str, prompt: str, max_tokens: int, stop: threading.Event | None = None,
                    arrivals: list | None = None, timeout_s: float = 600.0) -> tuple[float, list[tuple[float, int]]]:
    """One greedy gRPC stream of exactly `max_tokens`: (send time, [(arrival time, tokens in chunk)]).

    With `stop`, the stream is cancelled once it is set (what arrived so far is returned); with
    `arrivals`, chunks are appended to that list as they come, so another thread can watch it.
    TimeoutError (the stream cancelled) when nothing arrives for `timeout_s`."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    def tensor(name, arr):
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        return t

    inputs = [tensor("text_input", np.array([prompt.encode()], dtype=np.object_)),
              tensor("max_tokens", np.array([max_tokens], dtype=np.int32)),
              tensor("min_tokens", np.array([max_tokens], dtype=np.int32)),
              tensor("temperature", np.array([0.0], dtype=np.float32)),
              tensor("stream", np.array([True])), tensor("exclude_input_in_output", np.array([True]))]
    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    arrivals = [] if arrivals is None else arrivals
    poll_s = timeout_s if stop is None else 0.05  # how often a stoppable stream looks at `stop`
    finished = False
    sent = time.perf_counter()
    client.async_stream_infer("dsv4", inputs)
    try:
        idle_s = 0.0
        while stop is None or not stop.is_set():
            try:
                at, result, error = events.get(timeout=poll_s)
            except queue.Empty:
                idle_s += poll_s
                if idle_s >= timeout_s:
                    raise TimeoutError(f"no response for {idle_s:.0f} s") from None
                continue
            idle_s = 0.0
            if error is not None:
                raise RuntimeError(error)
            arrivals.append((at, len(result.as_numpy("output_ids"))))
            if result.as_numpy("finish_reason")[0]:
                finished = True
                break
        return sent, arrivals
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _stream_timings(url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, decode tokens/s after the first token, tokens) for one greedy gRPC stream."""
    sent, arrivals = stream_arrivals(url, prompt, max_tokens)
    tokens = sum(n for _, n in arrivals)
    first, last = arrivals[0][0], arrivals[-1][0]
    return first - sent, (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0, tokens


def text_prompt(codec, tokens: int) -> str:
    """Text of `tokens` - 1 tokens. Every word is at least one token, so `tokens` words are enough
    (encoding more costs seconds at a million tokens)."""
    words = " ".join(f"w{i % 97}" for i in range(tokens))
    ids = codec.encode(words, add_bos=False)[: tokens - 1]
    return codec.decode(ids)


def start_server(model: Path, device: str, work: Path, extra: list[str]) -> tuple[subprocess.Popen, str, float]:
    """dsv4-serve on free loopback ports: (process, gRPC url, seconds until it printed ready)."""
    from dsv4.scripts.triton_launcher import free_ports

    http, grpc, metrics = free_ports(3)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    serve = subprocess.Popen([sys.executable, "-m", "dsv4.scripts.serve", "--model", str(model), "--device", device,
                              "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                              "--workdir", str(work / "server"), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, ready = [], None
    for line in serve.stdout:
        seen.append(line)
        if "is ready" in line:
            ready = len(seen) - 1
        if ready is not None and line.startswith("try it:"):  # the banner's end: its GPU memory line is read
            break
    else:
        serve.wait()
        raise RuntimeError("dsv4-serve exited before it was ready:\n" + "".join(seen[-20:]))
    serve.banner = "".join(seen[ready:])
    serve.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    # keep reading: a full pipe would block the server's own prints
    threading.Thread(target=lambda: [None for _ in serve.stdout], daemon=True).start()
    return serve, f"127.0.0.1:{grpc}", time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", default="16,512,2048")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inproc-threads", type=int, default=1,
                        help="torch threads in-process (default 1: what each served stage gets on a 2-core machine)")
    args = parser.parse_args(argv)

    import torch
    from dsv4.backend.checkpoint.loader import load_model
    from dsv4.backend.generate import generate
    from dsv4.backend.sampler import SamplingParams
    from dsv4.backend.tokenizer import TextCodec

    codec = TextCodec.load(args.model)
    lengths = [int(x) for x in args.prompt_tokens.split(",")]
    serve, url, start_s = start_server(args.model, args.device, Path("runs/bench_serving"),
                                       ["--max-model-len", str(max(lengths) + args.max_tokens + 8)])
    rows = []
    try:
        _stream_timings(url, "warm up", 4)
        for n in lengths:
            # a different first word per run: a cold prefill every time (no prefix-cache hit) ...
            runs = [_stream_timings(url, f"run{r} " + text_prompt(codec, n), args.max_tokens) for r in range(args.repeats)]
            # ... then the last prompt again: its full blocks come from the prefix cache
            hit = _stream_timings(url, f"run{args.repeats - 1} " + text_prompt(codec, n), args.max_tokens)
            rows.append({"prompt": len(codec.encode(text_prompt(codec, n))), "ttft": statistics.median(r[0] for r in runs),
                         "hit_ttft": hit[0], "served_tps": statistics.median(r[1] for r in runs)})
    finally:
        serve.terminate()
        serve.wait(120)
    model = load_model(args.model, device=args.device, dtype=torch.float32 if args.device == "cpu" else torch.bfloat16, progress=False)
    torch.set_num_threads(int(args.inproc_threads))
    for row, n in zip(rows, lengths):
        ids = codec.encode(text_prompt(codec, n))
        generate(model, ids[:8], SamplingParams(temperature=0.0, max_tokens=2))
        t = time.perf_counter()
        generate(model, ids, SamplingParams(temperature=0.0, max_tokens=1))
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(model, ids, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
        total = time.perf_counter() - t
        row["inproc_ttft"] = prefill_s
        row["inproc_tps"] = (len(out.token_ids) - 1) / max(total - prefill_s, 1e-9)
    print(f"server start (dsv4-serve to first successful canary): {start_s:.1f} s\n")
    print(f"command: python scripts/bench_serving.py {' '.join(argv or sys.argv[1:])}")
    print(f"date: {datetime.date.today()}, machine: {platform.machine()} {torch.get_num_threads()} threads, device {args.device}\n")
    print("| prompt tokens | TTFT in-process (ms) | TTFT via Triton, cold (ms) | TTFT via Triton, prefix hit (ms) | "
          "decode tok/s in-process | decode tok/s via Triton | Triton / in-process |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompt']} | {r['inproc_ttft'] * 1000:.0f} | {r['ttft'] * 1000:.0f} | {r['hit_ttft'] * 1000:.0f} | "
              f"{r['inproc_tps']:.1f} | {r['served_tps']:.1f} | {r['served_tps'] / r['inproc_tps']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
