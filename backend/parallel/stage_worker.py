"""One follower rank of a served stage: `python -m dsv4.backend.parallel.stage_worker SPEC_JSON`.

Started by the stage's Triton model instance (`followers.start_followers`), it joins the stage's
group, loads and shards the same checkpoint, builds the same cache (and decode runner, or prefill
stage) that rank 0 builds, then replays rank 0's commands until told to stop or rank 0 goes away.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class StageSpec:
    """Everything a follower needs to build what rank 0 built (rank and port filled in per worker)."""

    stage: str  # "decode" or "prefill"
    model_dir: str
    dtype: str  # "fp32" or "bf16"
    kv_format: str
    max_len: int
    cache_bytes: int
    tensor_parallel: int
    expert_parallel: int
    threads: int
    max_batch: int = 0  # decode
    max_sequences: int = 0  # decode
    snapshot_interval: int = 0  # prefill
    max_prompts: int = 1  # prefill
    rank: int = 0
    port: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def serve_rank(spec: StageSpec) -> None:
    from ..checkpoint.loader import load_model
    from ..decode_runner import DecodeRunner
    from ..kv_cache.paged_cache import PagedCache
    from ..serving.prefill_stage import PrefillStage
    from ..serving.triton_io import compute_dtype
    from .group import ParallelConfig, join_group, loopback_init_method
    from .parallelize import parallelize
    from .replica import decode_handlers, follow, prefill_handlers

    torch.set_num_threads(spec.threads)
    parallel = ParallelConfig(spec.tensor_parallel, spec.expert_parallel)
    group = join_group(spec.rank, parallel.world_size, loopback_init_method(spec.port))
    dtype = compute_dtype({"dtype": spec.dtype})  # the adapters' reading of the same parameter
    model = parallelize(load_model(spec.model_dir, dtype=dtype, device="cpu", progress=False), parallel, group)
    if spec.stage == "decode":  # as DecodeEngine and the decode adapter build them
        cache = PagedCache.from_budget(model.cfg, dtype, "cpu", spec.cache_bytes, spec.max_len,
                                       max_num_seqs=spec.max_sequences, kv_format=spec.kv_format)
        runner = DecodeRunner(model, cache.storage, spec.max_batch, spec.max_len, frozenset(model.cfg.eos_token_ids),
                              cuda_graphs=False)
        handlers = decode_handlers(cache, runner)
    else:  # as the prefill adapter builds it
        stage = PrefillStage(None, "cpu", dtype, spec.max_len, spec.cache_bytes, snapshot_interval=spec.snapshot_interval,
                             kv_format=spec.kv_format, max_prompts=spec.max_prompts, model=model)
        handlers = prefill_handlers(stage)
    follow(handlers, group)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stage-worker %(levelname)s %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = StageSpec(**json.loads(args[0]))
    try:
        serve_rank(spec)
    except Exception:  # rank 0 gone (its socket closed) or a build that failed: nothing to serve
        logging.exception("%s rank %d stopped", spec.stage, spec.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
