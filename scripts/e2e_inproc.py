"""In-process measurements of our engine for bench_e2e: TTFT, decode step time at a batch and
context, the prefill -> decode handoff, KV bytes per token, and the longest sequence that fits.

Batched decode at a long context does not prefill every row: one request is prefilled, its state
exported once and imported into the other rows (the handoff path), so 128 x 128K rows cost one
128K prefill. Every figure synchronises the device before reading the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache, layout_for
from dsv4.backend.model.transformer import Transformer
from dsv4.backend.serving.handoff import export_state, import_state


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompt(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Token ids away from the special tokens at both ends of the vocabulary."""
    margin = min(1000, vocab // 8)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(margin, vocab - margin, (n,), generator=g)


@dataclass(frozen=True)
class Prefilled:
    cache: PagedCache
    rid: str
    first_token: int
    seconds: float


def prefill_one(model: Transformer, ids: torch.Tensor, extra_positions: int, kv_format: str,
                num_rows: int = 1, chunk: int = 8192) -> Prefilled:
    """Prefill `ids` into a cache with room for `num_rows` requests of len(ids) + extra_positions."""
    cache = PagedCache.for_requests(model.cfg, model.dtype, model.device, num_rows, len(ids) + extra_positions,
                                    kv_format=kv_format)
    seq = cache.admit("r0", len(ids) + extra_positions)
    ids = ids.to(model.device)
    sync(model.device)
    start = time.perf_counter()
    logits = prefill_prompt(model, cache.storage, seq, ids, chunk=chunk)
    first = int(logits[-1].argmax())
    sync(model.device)
    return Prefilled(cache, "r0", first, time.perf_counter() - start)


def kv_bytes_per_token(done: Prefilled, tokens: int) -> float:
    return done.cache.bytes_held(done.rid) / tokens


def handoff(done: Prefilled) -> dict:
    """Export the prefilled request and import it into a fresh reservation: bytes and ms each way."""
    storage, seq = done.cache.storage, done.cache.seqs[done.rid]
    sync(storage.device)
    t0 = time.perf_counter()
    header, payload = export_state(storage, seq)
    sync(storage.device)
    t1 = time.perf_counter()
    target = done.cache.admit("handoff", seq.position + 1)
    sync(storage.device)
    t2 = time.perf_counter()
    import_state(storage, target, header, payload)
    sync(storage.device)
    t3 = time.perf_counter()
    done.cache.release("handoff")
    return {"bytes": payload.numel() * payload.element_size(), "export_ms": (t1 - t0) * 1e3, "import_ms": (t3 - t2) * 1e3}


def decode_steps(model: Transformer, batch: int, context: int, steps: int, kv_format: str, seed: int = 0) -> dict:
    """Median decode step (ms) of `batch` requests each at `context` positions, and whether every
    row chose the same tokens (they hold copies of one state, so a faulty import shows here)."""
    done = prefill_one(model, random_prompt(context, model.cfg.vocab_size, seed), steps + 4, kv_format, num_rows=batch)
    storage = done.cache.storage
    header, payload = export_state(storage, done.cache.seqs[done.rid])
    seqs = [done.cache.seqs[done.rid]]
    for row in range(1, batch):
        seq = done.cache.admit(f"r{row}", context + steps + 4)
        import_state(storage, seq, header, payload)
        seqs.append(seq)
    del payload
    tokens = torch.full((batch,), done.first_token, dtype=torch.long, device=model.device)
    times, agree = [], True
    for step in range(steps + 2):
        sync(model.device)
        start = time.perf_counter()
        tokens = model.decode(tokens, seqs, storage).argmax(-1)
        sync(model.device)
        if step >= 2:  # the first steps warm allocators and autotuning
            times.append(time.perf_counter() - start)
        agree = agree and bool((tokens == tokens[0]).all())
    step_s = sorted(times)[len(times) // 2]
    return {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s, "rows_agree": agree}


def longest_sequence(model: Transformer, target: int, budget_bytes: int, kv_format: str, chunk: int = 8192,
                     time_limit_s: float = 300.0, progress=None) -> dict:
    """Prefill one request towards `target` positions in a pool of `budget_bytes`; stops at the
    target (capped by the model's positions and by what the budget holds), the time limit or the
    first out-of-memory, then times one decode step there."""
    limit = "target"
    if target > model.cfg.max_position_embeddings - 1:
        target, limit = model.cfg.max_position_embeddings - 1, "model positions"
    layout = layout_for(model.cfg, model.dtype, kv_format)
    spare = 2 * sum(layout.block_bytes)  # the pools' null pages

    def fits(n: int) -> bool:
        return layout.request_bytes(n + 1).total + spare <= budget_bytes

    if not fits(target):
        lo, hi = 0, target
        while hi - lo > 256:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        target, limit = lo, "KV budget"
    cache = PagedCache.from_budget(model.cfg, model.dtype, model.device, budget_bytes, target + 1, max_num_seqs=1,
                                   kv_format=kv_format)
    seq = cache.admit("long", target + 1)
    ids = random_prompt(target, model.cfg.vocab_size, seed=7)
    start = time.perf_counter()
    stopped = limit
    logits = None
    for lo in range(0, target, chunk):
        try:
            logits = model.prefill(ids[lo:lo + chunk].to(model.device), seq, cache.storage)
        except torch.cuda.OutOfMemoryError:
            stopped = "out of memory"
            break
        if progress is not None:
            progress(seq.position, target)
        if time.perf_counter() - start > time_limit_s:
            stopped = "time limit"
            break
    sync(model.device)
    prefill_s = time.perf_counter() - start
    tokens = seq.position
    step_ms = float("nan")
    if logits is not None and seq.position < target + 1:
        token = logits[-1:].argmax(-1)
        sync(model.device)
        t = time.perf_counter()
        model.decode(token, [seq], cache.storage)
        sync(model.device)
        step_ms = (time.perf_counter() - t) * 1e3
    return {"tokens": tokens, "stopped": stopped, "prefill_s": prefill_s, "decode_step_ms": step_ms,
            "kv_bytes": cache.bytes_held("long")}
