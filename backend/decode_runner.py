"""The decode step as the engine runs it: persistent rows, device sampling, CUDA graphs per batch bucket.

`DecodeRunner` owns the step's inputs (`DecodeSlots` plus the rows' sampling parameters), so a step
builds nothing: it replays the graph captured for the smallest bucket holding the live rows (or
runs the same forward eagerly), samples every row on the device, feeds the sampled tokens back
into the token row and advances positions and noise counters in place. Nothing in a step waits
for the host; the engine reads the tokens back once per step.

Graphs are captured at start-up, after an eager warm-up of each bucket that compiles every Triton
kernel for its shapes. Padding rows of a bucket point at the null block, so whatever they compute
lands where nothing reads.
"""

from __future__ import annotations

import logging

import torch

from .kv_cache.storage import KVStorage, SequenceState
from .model.decode_batch import DecodeSlots
from .model.transformer import Transformer
from .sampler import SamplingParams, SamplingRows, sample

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def graph_buckets(capacity: int) -> list[int]:
    """Batch sizes graphs are captured at: powers of two up to, and always including, the capacity."""
    return sorted({b for b in GRAPH_BUCKETS if b < capacity} | {capacity})


class DecodeRunner:
    def __init__(self, model: Transformer, storage: KVStorage, capacity: int, max_positions: int,
                 eos_ids: list[int] | tuple[int, ...] | frozenset[int], cuda_graphs: bool = True):
        self.model, self.storage, self.capacity = model, storage, capacity
        device = model.device
        self.slots = DecodeSlots(capacity, max_positions, device)
        f32, i64 = dict(dtype=torch.float32, device=device), dict(dtype=torch.int64, device=device)
        self.temperature = torch.zeros(capacity, **f32)
        self.top_k = torch.zeros(capacity, **i64)
        self.top_p = torch.ones(capacity, **f32)
        self.seed_lo = torch.zeros(capacity, **i64)
        self.seed_hi = torch.zeros(capacity, **i64)
        self.steps = torch.zeros(capacity, **i64)
        self.min_tokens = torch.zeros(capacity, **i64)
        self.filtered = [False] * capacity  # host mirror: does the row use top-k / top-p
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.int32, device=device)
        self.use_graphs = cuda_graphs and device.type == "cuda" and storage.use_kernels
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_logits: dict[int, torch.Tensor] = {}
        self.last_logits: torch.Tensor | None = None  # the latest step's logits (valid until the next step)

    @property
    def size(self) -> int:
        return self.slots.size

    def _sampling_columns(self) -> list[torch.Tensor]:
        return [self.temperature, self.top_k, self.top_p, self.seed_lo, self.seed_hi, self.steps, self.min_tokens]

    def add(self, seq: SequenceState, token: int, params: SamplingParams, seed: int, step: int, min_tokens: int) -> int:
        """A joining request (its cache state already imported); returns its row."""
        if not isinstance(seed, int) or seed < 0:  # checked before any row is touched
            raise ValueError(f"decode rows need a resolved seed (an integer >= 0), got {seed!r}")
        values = (float(params.temperature), params.top_k, float(params.top_p), seed & 0xFFFFFFFF,
                  (seed >> 32) & 0xFFFFFFFF, step, min_tokens)
        row = self.slots.add(seq, token)
        for column, value in zip(self._sampling_columns(), values):
            column[row] = value
        self.filtered[row] = not params.greedy and (params.top_k > 0 or params.top_p < 1)
        return row

    def remove(self, row: int) -> int | None:
        """Free a row (the last live row moves into it); returns the moved row's old index, if any."""
        last = self.slots.size - 1
        moved = self.slots.remove(row)
        if moved is not None:
            for column in self._sampling_columns():
                column[row] = column[last]
            self.filtered[row] = self.filtered[last]
        self.filtered[last] = False
        return moved

    def rows(self) -> list[SequenceState]:
        return [s for s in self.slots.seqs[: self.slots.size] if s is not None]

    def _bucket(self, n: int) -> int:
        return next((b for b in sorted(self.graphs) if b >= n), n)

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model.decode_batch(self.slots.tokens[:bucket], self.slots.batch(bucket), self.storage)

    def capture(self, buckets: list[int] | None = None) -> float:
        """Warm up (compile) and capture one graph per bucket, largest first; returns seconds taken.

        Call with no live rows: the warm-up steps write only the null block. `buckets` defaults to
        `graph_buckets(capacity)`; steps of more rows than the largest captured bucket run eagerly.
        """
        if not self.use_graphs:
            return 0.0
        assert self.slots.size == 0, "capture before any request joins"
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        buckets = sorted(buckets or graph_buckets(self.capacity))
        assert buckets[-1] <= self.capacity, f"bucket {buckets[-1]} > capacity {self.capacity}"
        with torch.cuda.stream(side):
            for bucket in buckets:
                for _ in range(2):  # compile, then run with every kernel loaded
                    self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        for bucket in reversed(buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.graph_logits[bucket] = self._forward(bucket)
            self.graphs[bucket] = graph
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        log.info("captured decode graphs for batch %s in %.1f s", buckets, seconds)
        return seconds

    def logits(self, n: int) -> torch.Tensor:
        """The forward of rows 0..n-1 (graph replay or eager): `[n, V]` float32, not yet sampled."""
        bucket = self._bucket(n)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.graph_logits[bucket][:n]
        return self._forward(bucket)[:n]

    def sampling_rows(self, n: int) -> SamplingRows:
        return SamplingRows(self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed_lo[:n], self.seed_hi[:n],
                            self.steps[:n], self.min_tokens[:n], any(self.filtered[:n]))

    def step(self) -> torch.Tensor:
        """One decode step of every live row: returns the sampled tokens `[n]` int64 on the device.

        The tokens are already fed back as the rows' next inputs; positions and noise counters advanced.
        """
        n = self.slots.size
        self.last_logits = self.logits(n)
        tokens = sample(self.last_logits, self.sampling_rows(n), self.eos_ids)
        self.slots.tokens[:n].copy_(tokens)
        self.slots.advance(n)
        self.steps[:n].add_(1)
        return tokens
