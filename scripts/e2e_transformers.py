"""The same measurements on transformers' DeepseekV4ForCausalLM (eager, the same checkpoint) for
bench_e2e: prefill time of one prompt and the decode step at a batch after a prompt.

Any failure (out of memory first of all) is returned as text for the table, not raised: the
point of the comparison is partly where transformers stops.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from dsv4.scripts.e2e_inproc import random_prompt, sync


def load(model_dir: Path, dtype: torch.dtype, device: torch.device):
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def _failure(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def prefill_s(model, tokens: int, device: torch.device, seed: int = 0) -> float | str:
    """Seconds for one forward over a `tokens`-long prompt with the cache on (its TTFT)."""
    ids = random_prompt(tokens, model.config.vocab_size, seed).to(device)[None]
    try:
        sync(device)
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        out.logits[:, -1].argmax(-1).tolist()
        sync(device)
        return time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return _failure(exc)
    finally:
        _free(device)


@torch.no_grad()
def decode_step_ms(model, batch: int, context: int, steps: int, device: torch.device, chunk: int = 2048) -> float | str:
    """Median decode step (ms) of `batch` rows after a `context`-token prompt (prefilled in chunks
    so that eager attention's [heads, chunk, context] scores fit)."""
    ids = random_prompt(context, model.config.vocab_size, 0).to(device)[None].expand(batch, -1)
    try:
        cache = None
        for lo in range(0, context, chunk):
            out = model(ids[:, lo:lo + chunk], cache=cache, use_cache=True)
            cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for step in range(steps + 2):
            sync(device)
            start = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            if step >= 2:
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return _failure(exc)
    finally:
        _free(device)
