"""What the parallel tests run, importable by the rank processes they spawn.

The workload: three requests of odd prompt lengths prefilled in one batch (every position's
logits), a second chunk for one of them, then batched decode steps with fixed tokens (so the runs
compared see the same inputs whatever they predict). 69 tokens wrap the 64-token window and give
the CSA layers more entries (17) than the indexer keeps (16).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.model.transformer import Transformer
from dsv4.backend.parallel.group import ParallelConfig
from dsv4.backend.parallel.handoff import recv_state, send_state
from dsv4.backend.parallel.parallelize import parallelize
from dsv4.backend.serving.handoff import export_state, import_state

PROMPT_LENGTHS = (1, 7, 69)
SECOND_CHUNK = 5
DECODE_STEPS = 4
MAX_POSITIONS = 128
HANDOFF_PROMPT = 300  # past one 256-position block: two pages of every compressed kind


@contextmanager
def one_thread():
    """The parent's reference runs on one thread, like each rank (two cores oversubscribed crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_workload(model: Transformer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    prompts = [torch.randint(0, 2000, (n,), generator=g) for n in PROMPT_LENGTHS]
    second = torch.randint(0, 2000, (SECOND_CHUNK,), generator=g)
    steps = torch.randint(0, 2000, (DECODE_STEPS, len(PROMPT_LENGTHS)), generator=g)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(PROMPT_LENGTHS), MAX_POSITIONS)
    seqs = [cache.admit(str(i), MAX_POSITIONS) for i in range(len(PROMPT_LENGTHS))]
    prefill = model.prefill_batch(list(zip(prompts, seqs)), cache.storage, all_logits=True)
    chunk = model.prefill(second, seqs[0], cache.storage, all_logits=True)
    decode = torch.stack([model.decode(tokens, seqs, cache.storage) for tokens in steps])
    return {"prefill": prefill, "second chunk": chunk, "decode": decode}


def run_kernel_workload(model: Transformer) -> dict[str, torch.Tensor]:
    """A smaller workload on the kernel path (Triton interpreter on a CPU): two prompts prefilled in
    one batch (every position's logits), then one batched decode step."""
    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(0, 2000, (n,), generator=g) for n in (3, 6)]
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(prompts), MAX_POSITIONS)
    cache.storage.use_kernels = True
    seqs = [cache.admit(str(i), MAX_POSITIONS) for i in range(len(prompts))]
    prefill = model.prefill_batch(list(zip(prompts, seqs)), cache.storage, all_logits=True)
    decode = model.decode(torch.tensor([5, 7]), seqs, cache.storage)
    return {"prefill (kernels)": prefill, "decode (kernels)": decode}


def run_parallel_kernels(group: dist.ProcessGroup, model_dir: str, parallel: ParallelConfig) -> dict:
    return run_kernel_workload(parallelize(load_model(model_dir, progress=False), parallel, group))


def run_parallel(group: dist.ProcessGroup, model_dir: str, configs: list[ParallelConfig]) -> list[dict]:
    """Each config on a freshly loaded full model, sharded for this rank."""
    return [run_workload(parallelize(load_model(model_dir, progress=False), parallel, group)) for parallel in configs]


def hand_off(group: dist.ProcessGroup, model_dir: str) -> dict:
    """Two processes with a full model each: rank 0 prefills and sends the request's state, rank 1
    imports it (into other block ids) and exports it again; both then decode one token."""
    rank = group.rank()
    model = load_model(model_dir, progress=False)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 2, 512)
    if rank == 1:
        cache.admit("someone else", 512)
    seq = cache.admit("r", 512)
    if rank == 0:
        prompt = torch.randint(0, 2000, (HANDOFF_PROMPT,), generator=torch.Generator().manual_seed(5))
        prefill_prompt(model, cache.storage, seq, prompt)
        header, payload = export_state(cache.storage, seq)
        send_state(header, payload, 1, group)
    else:
        header, received = recv_state(0, group)
        import_state(cache.storage, seq, header, received)
        header, payload = export_state(cache.storage, seq)
    logits = model.decode(torch.tensor([42]), [seq], cache.storage)
    return {"header": header, "payload": payload, "blocks": seq.csa_blocks, "logits": logits}
