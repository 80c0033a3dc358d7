"""Time encoding long prompts: one `encode` against pieces on all cores (`backend/tokenizer_split.py`).

    python scripts/bench_tokenizer.py --tokens 8192,32768,131072 --json runs/tokenizer.json

Prints a table (best of --repeats, ms) and checks the two give the same ids.
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
