"""dsv4-generate: generate text on this host (no server) from a V4 checkpoint, in this process or split
over several (--tensor-parallel, --expert-parallel: every rank computes the same tokens and logits,
and this command reports rank 0's)."""

from __future__ import annotations

import argparse
import json
import sys
import time

EPILOG = """examples (the tiny model that dsv4-serve makes on first use, or: dsv4-checkpoint tiny --out DIR):
  dsv4-generate --model ~/.cache/dsv4-triton/tiny --prompt "Hello" --max-tokens 32
  dsv4-generate --model ~/.cache/dsv4-triton/tiny --input-ids 0,100,200 --max-tokens 8 --json
  dsv4-generate --model ~/.cache/dsv4-triton/tiny --prompt "Hi" --max-tokens 1 --dump-logits /tmp/logits.npy
  dsv4-generate --model ~/.cache/dsv4-triton/tiny --prompt "Hi" --tensor-parallel 2 --expert-parallel 2
"""


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--input-ids must be comma-separated integers: {exc}") from exc


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dsv4-generate", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer, BOS added)")
    src.add_argument("--input-ids", type=_parse_ids, help="prompt as token ids, e.g. 0,100,200")
    parser.add_argument("--chat", action="store_true", help="wrap --prompt in the V4 chat template")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="compute dtype (default fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."}')
    parser.add_argument("--dump-logits", metavar="PATH", help="save float32 logits at every prompt position as .npy [prompt_len, vocab]")
    from dsv4.backend.parallel.options import add_parallel_arguments

    add_parallel_arguments(parser, "on this host: gloo on CPU, or one GPU per rank over NCCL with --device cuda")
    return parser.parse_args(argv)


def _dtype(args: argparse.Namespace):
    import torch

    name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _generate(args: argparse.Namespace, prompt_ids: list[int], params, parallel=None, group=None):
    """Load the model (this rank's shard of it, in a group), generate; returns (output, seconds)."""
    from dsv4.backend.checkpoint.loader import load_model
    from dsv4.backend.generate import generate
    from dsv4.backend.parallel.parallelize import parallelize

    first = group is None or group.rank() == 0
    model = load_model(args.model, dtype=_dtype(args), device=args.device, progress=first and sys.stderr.isatty())
    if group is not None:
        parallelize(model, parallel, group)
    start = time.perf_counter()
    out = generate(model, prompt_ids, params, keep_prompt_logits=args.dump_logits is not None)
    return out, time.perf_counter() - start


def _report(args: argparse.Namespace, codec, prompt_ids: list[int], out, elapsed: float) -> None:
    import numpy as np

    text = codec.decode(out.token_ids)
    if args.dump_logits:
        np.save(args.dump_logits, out.prompt_logits.float().cpu().numpy())
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": text, "finish_reason": out.finish_reason,
                          "num_input_tokens": len(prompt_ids), "elapsed_s": round(elapsed, 4)}, ensure_ascii=False))
    else:
        print(text)


def _generate_on_rank(group, args: argparse.Namespace, prompt_ids: list[int], params, parallel):
    """One rank of a parallel run: every rank generates the same tokens; rank 0 returns them (with
    its time) for this command to report, or on every rank the error a user should see."""
    from dsv4.backend.checkpoint.loader import CheckpointError
    from dsv4.backend.config import ConfigError

    try:
        out, elapsed = _generate(args, prompt_ids, params, parallel, group)
    except (ValueError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return str(exc)
    return (out, elapsed) if group.rank() == 0 else None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    from dsv4.backend.checkpoint.loader import CheckpointError
    from dsv4.backend.config import ConfigError, load_config
    from dsv4.backend.generate import resolve_seed
    from dsv4.backend.parallel.group import ParallelConfig
    from dsv4.backend.parallel.launch import spawn_ranks
    from dsv4.backend.sampler import SamplingParams
    from dsv4.backend.tokenizer import TextCodec

    try:
        # drawn here, not per rank: every rank must sample the same tokens
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=resolve_seed(args.seed), max_tokens=args.max_tokens)
        parallel = ParallelConfig(args.tensor_parallel, args.expert_parallel)
        cfg = load_config(args.model)
        if parallel.enabled:
            parallel.check_device(args.device)
            parallel.check_model(cfg)
            if args.device.startswith("cuda:"):
                raise ValueError(f"--device {args.device} with --tensor-parallel/--expert-parallel: rank r runs on "
                                 "GPU r; give --device cuda")
        codec = TextCodec.load(args.model)
        if args.input_ids is not None:
            prompt_ids = args.input_ids
        elif args.chat:
            prompt_ids = codec.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = codec.encode(args.prompt)
        bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"--input-ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
        if parallel.enabled:
            first = spawn_ranks(_generate_on_rank, parallel.world_size, args, prompt_ids, params, parallel,
                                device="cuda" if args.device == "cuda" else "cpu")[0]
            if isinstance(first, str):
                raise ValueError(first)
            out, elapsed = first
        else:
            out, elapsed = _generate(args, prompt_ids, params)
    except (ValueError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"dsv4-generate: {exc}", file=sys.stderr)
        return 2
    _report(args, codec, prompt_ids, out, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
