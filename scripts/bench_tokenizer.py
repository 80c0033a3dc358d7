"""Time the tokenizer's two hot paths: encoding long prompts (one `encode` against pieces on all
cores, `backend/tokenizer_split.py`) and decode's per-token text work (`TextState.push` for
--streams streams, what the decode loop does on the host each step).

    python scripts/bench_tokenizer.py --tokens 8192,32768,131072 --streams 128 --json runs/tokenizer.json

Prints tables (best of --repeats) and checks the two encodings give the same ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dsv4.backend.tokenizer import TextCodec
from dsv4.backend.tokenizer_split import encode_pieces
from dsv4.scripts.e2e_served import text_prompt


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8192,32768,131072", help="prompt lengths in tokens (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", type=int, default=128, help="streams of the detokenization table (0: skip it)")
    p.add_argument("--steps", type=int, default=200, help="tokens each of those streams takes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    codec = TextCodec.load()
    rows = []
    print(f"{os.cpu_count()} CPUs\n\n| tokens | characters | one encode (ms) | pieces (ms) | speed-up |\n|---:|---:|---:|---:|---:|")
    for n in (int(t) for t in args.tokens.split(",")):
        text = text_prompt(codec, n)
        whole = codec.tokenizer.encode(text, add_special_tokens=False).ids
        if encode_pieces(codec.tokenizer, text) != whole:
            print(f"pieces gave other ids than one encode at {n} tokens", file=sys.stderr)
            return 1
        one = _best_ms(lambda: codec.tokenizer.encode(text, add_special_tokens=False), args.repeats)
        pieces = _best_ms(lambda: encode_pieces(codec.tokenizer, text), args.repeats)
        rows.append({"tokens": len(whole), "chars": len(text), "one_ms": one, "pieces_ms": pieces})
        print(f"| {len(whole):,} | {len(text):,} | {one:.1f} | {pieces:.1f} | {one / pieces:.1f}x |", flush=True)
    detok = detokenize(codec, args.streams, args.steps, args.repeats) if args.streams else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows, "detokenize": detok}, indent=1))
    return 0


def detokenize(codec, streams: int, steps: int, repeats: int) -> dict:
    """Decode's host text work: `streams` requests each taking `steps` random tokens, one step at a time."""
    from random import Random

    from dsv4.backend.serving.request import RequestConfig
    from dsv4.backend.serving.text_state import TextState

    rng = Random(0)
    tokens = [[rng.randrange(1000, codec.vocab_size - 1000) for _ in range(streams)] for _ in range(steps)]
    config = RequestConfig(max_tokens=steps + 1, stream=True, num_input_tokens=1)

    def run():
        states = [TextState(config, codec, frozenset([codec.eos_id])) for _ in range(streams)]
        for step in tokens:
            for state, token in zip(states, step):
                state.push(token)

    ms = _best_ms(run, repeats)
    out = {"streams": streams, "steps": steps, "us_per_token": ms * 1e3 / (streams * steps),
           "ms_per_step": ms / steps}
    print(f"\n| streams | steps | µs per token | ms of host text work per step |\n|---:|---:|---:|---:|\n"
          f"| {streams} | {steps} | {out['us_per_token']:.2f} | {out['ms_per_step']:.3f} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
