"""The prefill stage's compute: its own model copy and prefix-cached pages, prompts begun, advanced a
chunk at a time (several in one pass) and exported for decode. Scheduling is `prefill_engine`'s."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv4.kernels.host_copy import to_device

from ..checkpoint.loader import load_model
from ..generate import PREFILL_CHUNK, PrefillCancelled, eos_ids_tensor, sample_tokens
from ..kv_cache.layout import BLOCK_TOKENS
from ..kv_cache.manager import chain_hashes, snapshot_boundaries
from ..kv_cache.paged_cache import PagedCache
from ..kv_cache.storage import SequenceState
from ..model.transformer import Transformer
from .handoff import StateHeader, export_state
from .request import RequestConfig


@dataclass
class PrefillStats:
    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # prompt tokens actually run (the rest came from the prefix cache)
    steps: int = 0  # batched passes through the model


@dataclass
class PrefillJob:
    """One prompt on its way through prefill: its cache reservation and where its chunks must end."""

    key: str  # the request's name in the prefill cache
    ids: np.ndarray  # int64 prompt tokens
    config: RequestConfig
    hashes: list[int]
    seq: SequenceState
    prompt: torch.Tensor  # the ids on the model's device
    stops: list[int]  # positions a chunk must end at: the cache points past the start, then len(ids)
    steps: int = 0  # chunks run so far

    @property
    def done(self) -> bool:
        return self.seq.position >= len(self.ids)

    def next_end(self, chunk: int) -> int:
        """Where this job's next chunk ends: `chunk` tokens on, or the next cache point if sooner
        (the in-process chunking: `prefill_prompt` from each cache point)."""
        stop = next(s for s in self.stops if s > self.seq.position)
        return min(self.seq.position + chunk, stop)


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    header: StateHeader
    payload: torch.Tensor  # on the model's device


def warm_up_passes(model, chunk: int, widest: int, kv_format: str, eos: torch.Tensor) -> None:
    """Run the shapes serving will use on throwaway caches, so the kernels are compiled before the
    first request: `widest` whole chunks in one pass (the largest step, so the memory peak); two
    ragged prompts in one pass; passes of 1, 2, 4 ... 128 tokens (MoE's sort kernel takes one
    variant per power of two of a small pass); a prompt continued in a second chunk (it reads back
    the window its first chunk wrote); the first token's sampling. The kernels take lengths and
    positions unspecialised, so these cover every prompt (tests/gpu/test_prefill_compiles_gpu.py)."""
    cfg, device = model.cfg, model.device
    g = torch.Generator().manual_seed(0)
    small = [[1 << i] for i in range(8)]
    for group in ([chunk] * widest, [chunk // 2 + 3, 1], *small, [BLOCK_TOKENS + 44]):
        cache = PagedCache.for_requests(cfg, model.dtype, device, len(group), max(group) + 1, kv_format=kv_format)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).to(device) for n in group]
        seqs = [cache.admit(str(i), n + 1) for i, n in enumerate(group)]
        if group == [BLOCK_TOKENS + 44]:  # the continued prompt: its first block, then the rest
            model.prefill_batch([(prompts[0][:BLOCK_TOKENS], seqs[0])], cache.storage)
            prompts = [prompts[0][BLOCK_TOKENS:]]
        logits = model.prefill_batch(list(zip(prompts, seqs)), cache.storage)
        sample_tokens(logits, [RequestConfig(max_tokens=1).sampling()] * len(group), list(range(len(group))),
                      [0] * len(group), [0] * len(group), eos)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PrefillStage:
    """Runs prompts through its own model copy, several at a time, and exports each request's cache state.

    Prefix caching: full 256-token blocks of every prompt stay cached (LRU) after the request
    leaves; the window ring and compressor state are kept at cache points (the last block
    boundary of each prompt, and every `snapshot_interval` blocks), so a later prompt with the
    same prefix resumes at that boundary with exactly the state a cold run had there.
    `begin` reserves a prompt's blocks, `step` runs one chunk of each of several prompts in one
    pass (`PrefillEngine` decides which), `abort` frees a prompt that will not finish.
    """

    def __init__(self, model_dir: str | Path, device: str, dtype: torch.dtype, max_model_len: int,
                 cache_bytes: int | None, snapshot_slots: int = 64, snapshot_interval: int = 0, kv_format: str = "float",
                 max_prompts: int = 1, model: Transformer | None = None):
        # `model`: weights already loaded in this process (decode's, when both stages share it)
        self.model = model if model is not None else load_model(model_dir, dtype=dtype, device=device, progress=False)
        self.max_model_len, self.max_prompts, self.snapshot_slots = max_model_len, max_prompts, snapshot_slots
        self.snapshot_interval, self.kv_format = snapshot_interval, kv_format
        self.cache: PagedCache | None = None
        if cache_bytes is not None:
            self.allocate(cache_bytes)
        self.eos = eos_ids_tensor(self.model.cfg.eos_token_ids, self.model.device)
        self.stats = PrefillStats()
        self._ids = 0

    def allocate(self, cache_bytes: int) -> None:
        """Make the pools from a byte budget (None at construction defers this until after `warm_up`,
        when the budget comes from measured GPU memory)."""
        self.cache = PagedCache.from_budget(self.model.cfg, self.model.dtype, self.model.device, cache_bytes,
                                            self.max_model_len, max_num_seqs=self.max_prompts,
                                            snapshots=self.snapshot_slots, kv_format=self.kv_format)

    def begin(self, input_ids: np.ndarray | list[int], config: RequestConfig) -> PrefillJob | None:
        """Reserve the prompt's blocks (resuming at a cached prefix); None while the cache is too full."""
        # from the array, not element by element: a long prompt's conversion would otherwise hold the
        # GIL for tens of milliseconds, stalling a decode loop in the same process
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if not ids.size:
            raise ValueError("prefill needs at least one prompt token")
        hashes = chain_hashes(ids)
        if not self.cache.can_admit(len(ids), hashes, prompt_len=len(ids)):
            return None
        self._ids += 1
        key = f"prefill-{self._ids}"
        seq = self.cache.admit(key, len(ids), hashes, prompt_len=len(ids))
        start = seq.position
        self.stats.requests += 1
        self.stats.prompt_tokens += len(ids)
        self.stats.computed_tokens += len(ids) - start
        stops = [b * BLOCK_TOKENS for b in snapshot_boundaries(len(ids), self.snapshot_interval) if b * BLOCK_TOKENS > start]
        prompt = to_device(ids, torch.int64, self.model.device)  # queued: the pass before may still be running
        return PrefillJob(key, ids, config, hashes, seq, prompt, [*stops, len(ids)])

    def step(self, plan: list[tuple[PrefillJob, int]]) -> list[tuple[PrefillJob, PrefillResult]]:
        """Advance each planned job to its end position in one pass; the finished ones are exported,
        released and returned with their first token. On an exception nothing is released: the
        caller aborts the plan's jobs."""
        chunks = [(job.prompt[job.seq.position:end], job.seq) for job, end in plan]
        logits = self.model.prefill_batch(chunks, self.cache.storage)
        self.stats.steps += 1
        finished = []
        for i, (job, end) in enumerate(plan):
            job.steps += 1
            if job.done:
                finished.append((job, logits[i]))
            elif end in job.stops:  # a cache point: keep the ring and compressor state there
                self.cache.save_snapshot(job.key, job.hashes)
        if not finished:
            return []
        configs = [job.config for job, _ in finished]
        sampled = sample_tokens(torch.stack([row for _, row in finished]), [c.sampling() for c in configs],
                                [c.seed for c in configs], [0] * len(configs), [c.min_tokens for c in configs], self.eos)
        if self.model.device.type == "cuda":  # wait here, without the GIL: a decode loop beside it keeps stepping
            torch.cuda.current_stream(self.model.device).synchronize()
        tokens = sampled.tolist()
        out = []
        for (job, _), token in zip(finished, tokens):
            self.cache.publish(job.key, job.hashes)
            header, payload = export_state(self.cache.storage, job.seq)
            self.abort(job)
            out.append((job, PrefillResult(int(token), header, payload)))
        if self.model.device.type == "cuda":  # the payloads leave on other threads and processes
            torch.cuda.current_stream(self.model.device).synchronize()
        return out

    def abort(self, job: PrefillJob) -> None:
        if job.key in self.cache.seqs:
            self.cache.release(job.key)

    def warm_up(self, chunk: int, widest: int = 1) -> float:
        """`warm_up_passes` on this stage's model before the server reports ready; returns the seconds."""
        start = time.perf_counter()
        warm_up_passes(self.model, chunk, widest, self.kv_format, self.eos)
        return time.perf_counter() - start

    def run(self, input_ids: np.ndarray | list[int], config: RequestConfig, chunk: int = PREFILL_CHUNK,
            should_stop: Callable[[], bool] | None = None) -> PrefillResult:
        """One prompt alone, start to end (what the engine does with a batch of one)."""
        job = self.begin(input_ids, config)
        if job is None:
            raise RuntimeError("the prefill cache cannot hold this prompt now")
        try:
            while True:
                if should_stop is not None and job.steps and should_stop():
                    raise PrefillCancelled(f"cancelled after {job.seq.position} of {len(job.ids)} prompt tokens")
                done = self.step([(job, job.next_end(chunk))])
                if done:
                    return done[0][1]
        finally:
            self.abort(job)
