"""dsv4-checkpoint: write a random DeepSeek-V4-architecture checkpoint for a named preset."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from dsv4.backend.config import ConfigError, ModelConfig
from dsv4.backend.presets import PRESETS, preset

EPILOG = """examples:
  dsv4-checkpoint tiny --out checkpoints/tiny
  dsv4-checkpoint flash-mini --out /data/flash-mini --seed 1
  dsv4-checkpoint tiny --out /tmp/t2 --set num_layers=6 --set window=32
  dsv4-checkpoint tiny --out /tmp/tq --naming official --quantize fp8
"""

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def apply_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """`--set field=value` (value parsed as JSON, else taken as a string)."""
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects field=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in ModelConfig.__dataclass_fields__:
            raise ConfigError(f"--set: unknown config field {key!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        changes[key] = tuple(value) if isinstance(value, list) else value
    if "num_layers" in changes and "layer_types" not in changes:
        n = changes["num_layers"]
        changes["layer_types"] = tuple((cfg.layer_types * n)[:n])
        changes["mlp_types"] = tuple((cfg.mlp_types + cfg.mlp_types[-1:] * n)[:n])
    return replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-checkpoint", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype of the weights (default bf16)")
    parser.add_argument("--naming", choices=["transformers", "official"], default="transformers",
                        help="tensor names: what transformers save_pretrained writes (default) or the release's")
    parser.add_argument("--quantize", choices=["none", "fp8"], default="none",
                        help="fp8: FP8 e4m3 128x128-block weights and FP4 experts, as the release ships")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    parser.add_argument("--shard-gib", type=float, default=2.0, help="split into shards of about this size (GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(preset(args.preset), args.set)
    except (ConfigError, TypeError) as exc:
        print(f"dsv4-checkpoint: {exc}", file=sys.stderr)
        return 2
    from dsv4.backend.checkpoint.writer import write_checkpoint

    out = write_checkpoint(cfg, args.out, seed=args.seed, dtype=DTYPES[args.dtype], naming=args.naming,
                           quantize=args.quantize == "fp8", shard_bytes=int(args.shard_gib * (1 << 30)),
                           progress=not args.quiet)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
