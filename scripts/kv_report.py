"""dsv4-kv-report: KV-cache bytes of one request as this project pages them, next to the paper's theory."""

from __future__ import annotations

import argparse
import json
import sys

from dsv4.backend.config import ConfigError, ModelConfig, load_config
from dsv4.backend.kv_cache.layout import KINDS, KVLayout, StorageFormat
from dsv4.backend.kv_cache.manager import KVCacheManager
from dsv4.backend.presets import PRESETS, preset

GIB = 1 << 30

EXAMPLES = """\
examples:
  dsv4-kv-report --preset flash                         # V4-Flash, 1M context, fp8 entries + fp8 index keys
  dsv4-kv-report --preset pro --index-dtype fp4 --json  # V4-Pro with fp4 index keys, machine-readable
  dsv4-kv-report --model ~/.cache/dsv4-triton/tiny --context 8192 --format bf16 --budget-gib 4
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4-kv-report",
        description=(
            "Print the KV-cache bytes one request of --context positions holds (per cache kind, "
            "exactly as the block manager allocates them) beside the V4 paper's per-layer formulas, "
            "and how many such requests fit in a memory budget."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named model shape (default: flash)")
    src.add_argument("--model", metavar="DIR", help="a model folder; its config.json is read")
    p.add_argument("--context", type=int, default=1048576, metavar="N", help="positions per request (default: 1048576)")
    p.add_argument(
        "--format", choices=("fp8", "bf16", "fp32"), default="fp8",
        help="storage of main K=V entries (default: fp8, the 584-byte FlashMLA layout at V4 shapes)",
    )
    p.add_argument(
        "--index-dtype", choices=("fp8", "fp4", "bf16", "fp32"), default=None,
        help="storage of indexer keys (default: fp8 with --format fp8, else the --format dtype)",
    )
    p.add_argument("--budget-gib", type=float, default=80.0, metavar="G", help="KV memory budget in GiB (default: 80)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _requests_in_budget(layout: KVLayout, budget_bytes: int, context: int) -> int:
    # what the block manager would admit: its pools sized from the budget, requests of `context` positions
    try:
        manager = KVCacheManager.from_budget(layout, budget_bytes, context)
    except ValueError:
        return 0
    demand = layout.blocks_for_tokens(context)._asdict()
    return min((manager.pools[k].num_blocks - 1) // demand[k] for k in manager.pools if demand[k])


def report(cfg: ModelConfig, context: int, fmt: StorageFormat, budget_bytes: int) -> dict:
    """The report as a JSON-ready dict (bytes are integers; ratio = total / theory)."""
    layout = KVLayout.from_config(cfg, fmt)
    blocks = layout.blocks_for_tokens(context)
    held = layout.request_bytes(context)
    theory = layout.theory_bytes(context)
    per_kind = {}
    for i, kind in enumerate(KINDS):
        k = layout.kinds[i]
        per_kind[kind] = {
            "layers": k.num_layers,
            "entries_per_block": k.entries_per_block if k.layers else 0,
            "block_bytes": k.block_bytes,
            "blocks": blocks[i],
            "bytes": held.per_kind[i],
            "bytes_per_token": held.per_kind[i] / context,
            "theory_bytes": theory[i],
            "theory_bytes_per_token": theory[i] / context,
        }
    theory_total = theory.total()
    return {
        "context": context,
        "format": fmt.main,
        "index_dtype": fmt.index,
        "main_entry_bytes": fmt.main_entry_bytes,
        "index_key_bytes": fmt.index_key_bytes,
        "per_kind": per_kind,
        "fixed_bytes_per_request": held.fixed,
        "total_bytes": held.total,
        "theory_total_bytes": theory_total,
        "ratio": held.total / theory_total if theory_total else float("inf"),
        "budget_bytes": budget_bytes,
        "requests_in_budget": _requests_in_budget(layout, budget_bytes, context),
    }


def _human(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _table(name: str, r: dict) -> str:
    fixed = r["fixed_bytes_per_request"]
    lines = [
        f"{name}: {r['context']} positions, main entries {r['format']} ({r['main_entry_bytes']} B), "
        f"index keys {r['index_dtype']} ({r['index_key_bytes']} B)",
        "",
        f"{'kind':<10} {'layers':>6} {'block':>10} {'blocks':>8} {'bytes':>11} {'B/token':>9} "
        f"{'theory':>11} {'theory B/tok':>12}",
    ]
    for kind, k in r["per_kind"].items():
        lines.append(
            f"{kind:<10} {k['layers']:>6} {_human(k['block_bytes']):>10} {k['blocks']:>8} {_human(k['bytes']):>11} "
            f"{k['bytes_per_token']:>9.2f} {_human(k['theory_bytes']):>11} {k['theory_bytes_per_token']:>12.2f}"
        )
    lines += [
        "",
        f"fixed per request (ring + accumulators): {_human(fixed)} ({fixed} B)",
        f"total: {_human(r['total_bytes'])} ({r['total_bytes']} B); theory: {_human(r['theory_total_bytes'])} "
        f"({r['theory_total_bytes']} B); ratio {r['ratio']:.4f}",
        f"requests of this length in {_human(r['budget_bytes'])}: {r['requests_in_budget']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.context < 1:
        _parser().error(f"--context must be >= 1, got {args.context}")
    if args.budget_gib <= 0:
        _parser().error(f"--budget-gib must be > 0, got {args.budget_gib}")
    try:
        cfg = load_config(args.model) if args.model else preset(args.preset or "flash")
        fmt = StorageFormat.named(cfg, args.format, args.index_dtype)
        result = report(cfg, args.context, fmt, int(args.budget_gib * GIB))
    except (ConfigError, ValueError) as exc:
        print(f"dsv4-kv-report: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(args.model or args.preset or "flash", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
