"""Prefill and decode primitives shared by in-process generation and the served stages.

A request's i-th generated token is sampled with noise counter i (`sampler`), so a token depends
only on (seed, step, logits): the same whether the prefill and decode stages run in one process
or two, and whatever else shares the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache.paged_cache import PagedCache
from .kv_cache.storage import KVStorage, SequenceState
from .model.transformer import Transformer
from .sampler import SamplingParams, SamplingRows, sample

PREFILL_CHUNK = 512


def resolve_seed(seed: int | None) -> int:
    """Requests without a seed still get a fixed one at arrival, so their stream is reproducible in logs."""
    return random.getrandbits(63) if seed is None else seed


def eos_ids_tensor(eos: list[int] | tuple[int, ...] | frozenset[int], device: torch.device | str) -> torch.Tensor:
    """The ids `sample` bans before min_tokens, as the int32 device tensor it takes."""
    return torch.tensor(sorted(eos), dtype=torch.int32, device=device)


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
                  min_tokens: list[int] | None = None, banned_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row for requests outside a decode batch (prefill's first token, `generate`)."""
    rows = SamplingRows.build(params, seeds, steps, min_tokens, logits.device)
    return sample(logits, rows, banned_ids)


class PrefillCancelled(RuntimeError):
    """The caller's `should_stop` turned true between two prefill chunks."""


def prefill_prompt(model: Transformer, storage: KVStorage, seq: SequenceState, prompt: torch.Tensor,
                   chunk: int = PREFILL_CHUNK, all_logits: bool = False,
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Run the prompt (from seq.position) in chunks; returns the last position's logits [1, V]
    (or every position's [S, V] when `all_logits`). `should_stop` is polled between chunks."""
    outs = []
    for lo in range(0, prompt.shape[0], chunk):
        if should_stop is not None and lo and should_stop():
            raise PrefillCancelled(f"cancelled after {lo} of {prompt.shape[0]} prompt tokens")
        out = model.prefill(prompt[lo:lo + chunk], seq, storage, all_logits=all_logits)
        outs.append(out)
    return torch.cat(outs) if all_logits else outs[-1]


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length"
    prompt_logits: torch.Tensor | None = None


def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams, chunk: int = PREFILL_CHUNK,
             keep_prompt_logits: bool = False) -> GenerationOutput:
    """Generate for one request in this process (no server); stops at EOS or max_tokens."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    total = len(prompt_ids) + params.max_tokens
    if total > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds the model's "
                         f"{model.cfg.max_position_embeddings} positions")
    cache = PagedCache.for_requests(model.cfg, model.dtype, model.device, 1, total)
    seq = cache.admit("generate", total)
    storage = cache.storage
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=model.device)
    logits = prefill_prompt(model, storage, seq, prompt, chunk, all_logits=keep_prompt_logits)
    seed = resolve_seed(params.seed)
    eos = set(model.cfg.eos_token_ids)
    out: list[int] = []
    last = logits[-1:]
    while True:
        token = int(sample_tokens(last, [params], [seed], [len(out)])[0])
        if token in eos:
            return GenerationOutput(out, "stop", logits if keep_prompt_logits else None)
        out.append(token)
        if len(out) >= params.max_tokens:
            return GenerationOutput(out, "length", logits if keep_prompt_logits else None)
        last = model.decode(torch.tensor([token], device=model.device), [seq], storage)
