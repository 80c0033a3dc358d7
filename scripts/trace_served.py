"""Where a served request's time goes: dsv4-serve with Triton's TIMESTAMPS trace on, a few prompts
one at a time (lengths repeated, so a first-of-its-length cost shows against a repeat), the TTFT of
each printed; Triton writes the per-model timestamps to OUT/trace.json when the server stops."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsv4.backend.tokenizer import TextCodec
from dsv4.scripts.bench_serving import _stream_timings, start_server, text_prompt

PROMPTS = (("a", 16), ("b", 8192), ("c", 8192), ("d", 2048), ("e", 16), ("f", 32768), ("g", 512))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path, help="checkpoint directory")
    parser.add_argument("out", type=Path, help="folder for trace.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out.resolve() / "trace.json"
    extra = ["--max-model-len", "40000", "--max-batch", "8", "--max-sequences", "8",
             f"--triton-arg=--trace-config=triton,file={trace}", "--triton-arg=--trace-config=level=TIMESTAMPS",
             "--triton-arg=--trace-config=rate=1"]
    codec = TextCodec.load(args.model)
    serve, url, start_s = start_server(args.model, args.device, Path("/tmp/trace_run"), extra)
    print(f"server start {start_s:.1f} s", flush=True)
    try:
        for name, tokens in PROMPTS:
            sent = time.time()
            ttft = _stream_timings(url, f"{name} " + text_prompt(codec, tokens), 4)[0]
            print(f"{name} {tokens} tokens: TTFT {ttft * 1e3:.1f} ms (sent at {sent:.3f})", flush=True)
    finally:
        serve.terminate()
        serve.wait(120)
    print(f"trace: {trace}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
