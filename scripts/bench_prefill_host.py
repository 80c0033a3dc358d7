"""Host-side costs of a prefill pass that need no GPU: the Triton kernel launches one pass makes
(counted under the Triton interpreter on a small preset, several prompts at once) and the time to
hash a prompt's blocks for the prefix cache (`chain_hashes`, which holds the GIL in decode's process).

    python scripts/bench_prefill_host.py --prompts 1,8 --hash-tokens 131072,1048576 --json runs/prefill_host.json

Prints two tables. Launch counts are exact; hash times are the best of --repeats on this machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # count launches without a GPU

import numpy as np  # noqa: E402
import torch  # noqa: E402


def count_launches(preset: str, prompts: int) -> collections.Counter:
    """Triton launches of one kernel-path prefill pass over `prompts` short prompts of different lengths."""
    from triton.runtime.interpreter import InterpretedFunction

    from dsv4.backend import presets
    from dsv4.backend.checkpoint.writer import randomize_weights
    from dsv4.backend.kv_cache.paged_cache import PagedCache
    from dsv4.backend.model.transformer import Transformer

    cfg = presets.preset(preset)
    model = randomize_weights(Transformer(cfg, torch.float32), seed=3).eval()
    cache = PagedCache.for_requests(cfg, torch.float32, "cpu", prompts, 64)
    cache.storage.use_kernels = True
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randint(0, cfg.vocab_size, (5 + i,), generator=g), cache.admit(str(i), 64)) for i in range(prompts)]
    counts: collections.Counter = collections.Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    try:
        model.prefill_batch(chunks, cache.storage)
    finally:
        InterpretedFunction.run = run
    return counts


def hash_ms(tokens: int, as_array: bool, repeats: int) -> float:
    from dsv4.backend.kv_cache.manager import chain_hashes

    ids = np.random.default_rng(0).integers(0, 120_000, tokens)
    ids = ids if as_array else ids.tolist()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chain_hashes(ids)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset for the launch count (random weights; default tiny)")
    p.add_argument("--prompts", default="1,8", help="prompts per pass to count launches for (comma-separated; '' skips)")
    p.add_argument("--hash-tokens", default="131072,1048576", help="prompt lengths to hash (comma-separated; '' skips)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    report = {"launches": [], "hashes": []}
    if args.prompts:
        print("| prompts in the pass | Triton launches | by kernel |\n|---:|---:|---|")
        for n in (int(v) for v in args.prompts.split(",")):
            counts = count_launches(args.preset, n)
            report["launches"].append({"preset": args.preset, "prompts": n, "launches": sum(counts.values()),
                                       "by_kernel": dict(counts)})
            print(f"| {n} | {sum(counts.values())} | {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} |",
                  flush=True)
    if args.hash_tokens:
        print("\n| prompt tokens | chain_hashes from a list (ms) | from an int64 array (ms) |\n|---:|---:|---:|")
        for n in (int(v) for v in args.hash_tokens.split(",")):
            row = {"tokens": n, "list_ms": hash_ms(n, False, args.repeats), "array_ms": hash_ms(n, True, args.repeats)}
            report["hashes"].append(row)
            print(f"| {n:,} | {row['list_ms']:.2f} | {row['array_ms']:.2f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
