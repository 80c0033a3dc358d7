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


def replicate(done: Prefilled, batch: int, positions: int) -> list:
    """`batch` requests holding copies of the prefilled one (handoff export, then imports)."""
    storage = done.cache.storage
    header, payload = export_state(storage, done.cache.seqs[done.rid])
    seqs = [done.cache.seqs[done.rid]]
    for row in range(1, batch):
        seq = done.cache.admit(f"r{row}", positions)
        import_state(storage, seq, header, payload)
        seqs.append(seq)
    return seqs


def profile_step(run, device: torch.device, table: list | None = None) -> tuple[int | None, float | None]:
    """(CUDA kernels one call of `run` launches, share of its time the GPU is busy in kernels).

    Kernel counts and times come from the profiler; the call's time from CUDA events in a run
    without the profiler (tracing stretches the gaps between kernels). With `table`, appends
    (kernel name, calls, total us) rows, slowest first.
    """
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    end.synchronize()
    call_us = start.elapsed_time(end) * 1e3 / 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    if table is not None:
        totals: dict[str, list] = {}
        for e in kernels:
            row = totals.setdefault(e.name, [0, 0.0])
            row[0] += 1
            row[1] += e.device_time
        table.extend(sorted(((n, c, t) for n, (c, t) in totals.items()), key=lambda r: -r[2]))
    return len(kernels), min(1.0, busy_us / call_us) if call_us > 0 else None


def decode_steps(model: Transformer, batch: int, context: int, steps: int, kv_format: str, seed: int = 0,
                 cuda_graphs: bool = True, kernel_table: list | None = None) -> dict:
    """Median decode step (ms) of `batch` requests each at `context` positions, run as the served
    decode runs it (`DecodeRunner`: persistent rows, device sampling, a CUDA graph at the batch),
    whether every row computed bitwise-equal logits at every step (they hold copies of one state),
    and the kernels one step launches with the GPU's busy share (eager step, profiler)."""
    from dsv4.backend.decode_runner import DecodeRunner
    from dsv4.backend.sampler import SamplingParams

    positions = context + steps + 8
    done = prefill_one(model, random_prompt(context, model.cfg.vocab_size, seed), steps + 8, kv_format, num_rows=batch)
    runner = DecodeRunner(model, done.cache.storage, batch, positions, model.cfg.eos_token_ids, cuda_graphs=cuda_graphs)
    kernels, busy = profile_step(lambda: runner._forward(batch), model.device, kernel_table)  # no rows yet: null blocks
    runner.capture([batch])
    for seq in replicate(done, batch, positions):
        runner.add(seq, done.first_token, SamplingParams(temperature=0.0), seed=0, step=1, min_tokens=0)
    times, agree = [], True
    for step in range(steps + 2):
        sync(model.device)
        start = time.perf_counter()
        runner.step()
        sync(model.device)
        if step >= 2:  # the first steps warm allocators
            times.append(time.perf_counter() - start)
        logits = runner.last_logits
        agree = agree and bool((logits == logits[:1]).all())
    step_s = sorted(times)[len(times) // 2]
    graph_ms = None
    if runner.graphs:
        graph_kernels, graph_busy = profile_step(runner.graphs[batch].replay, model.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            runner.graphs[batch].replay()
        end.record()
        end.synchronize()
        graph_ms = start.elapsed_time(end) / 10
    else:
        graph_kernels, graph_busy = None, None
    return {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s, "rows_agree": agree, "kernels_per_step": kernels,
            "gpu_busy_eager": busy, "gpu_busy_graph": graph_busy, "graph_kernels": graph_kernels, "graph_ms": graph_ms}


def longest_sequence(model: Transformer, target: int, budget_bytes: int, kv_format: str, chunk: int = 8192,
                     time_limit_s: float = 300.0, progress=None) -> dict:
    """Prefill one request towards `target` positions in a pool of `budget_bytes`; stops at the
    target (capped by the model's positions and by what the budget holds), the time limit or the
    first out-of-memory, then times decode steps there (a CUDA graph at batch 1; median of 5)."""
    limit = "target"
    room = 8  # positions reserved past the prompt for the timed decode steps
    if target > model.cfg.max_position_embeddings - room:
        target, limit = model.cfg.max_position_embeddings - room, "model positions"
    layout = layout_for(model.cfg, model.dtype, kv_format)
    spare = 2 * sum(layout.block_bytes)  # the pools' null pages

    def fits(n: int) -> bool:
        return layout.request_bytes(n + room).total + spare <= budget_bytes

    if not fits(target):
        lo, hi = 0, target
        while hi - lo > 256:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        target, limit = lo, "KV budget"
    cache = PagedCache.from_budget(model.cfg, model.dtype, model.device, budget_bytes, target + room, max_num_seqs=1,
                                   kv_format=kv_format)
    seq = cache.admit("long", target + room)
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
    if logits is not None:
        from dsv4.backend.decode_runner import DecodeRunner
        from dsv4.backend.sampler import SamplingParams

        runner = DecodeRunner(model, cache.storage, 1, target + room, model.cfg.eos_token_ids)
        runner.capture([1])
        runner.add(seq, int(logits[-1].argmax()), SamplingParams(temperature=0.0), seed=0, step=1, min_tokens=0)
        times = []
        for _ in range(6):
            sync(model.device)
            t = time.perf_counter()
            runner.step()
            sync(model.device)
            times.append((time.perf_counter() - t) * 1e3)
        step_ms = sorted(times[1:])[len(times[1:]) // 2]
    return {"tokens": tokens, "stopped": stopped, "prefill_s": prefill_s, "decode_step_ms": step_ms,
            "kv_bytes": cache.bytes_held("long")}


def engine_streams(model: Transformer, codec, streams: int, context: int, tokens: int, chunk: int, budget: int,
                   max_prompts: int, prefill_gib: float, kv_format: str | None = None, timeout_s: float = 600.0) -> dict:
    """`streams` prompts of `context` tokens sent at once to the served engines run in this process
    (`colocated_rig`: dsv4-serve's colocated prefill and decode, no Triton), each making `tokens`
    tokens; the figures of `e2e_served.concurrent_streams`, so the two compare like for like."""
    from dsv4.scripts.colocated_rig import Rig
    from dsv4.scripts.e2e_served import stream_rates

    rig = Rig(model, chunk, budget, max_prompts, streams, context + tokens + 64, prefill_gib, codec, kv_format)
    try:
        rids = list(range(streams))
        for rid in rids:
            rig.submit(rid, context, tokens)
        rig.pump(lambda: all(rid in rig.done for rid in rids), timeout_s)
        return stream_rates([(rig.sent[rid], rig.arrivals[rid]) for rid in rids])
    finally:
        rig.stop()
