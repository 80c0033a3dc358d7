"""The tokenizer and prefill stages, free of Triton types (the model.py adapters convert tensors)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.loader import load_model
from ..config import load_config
from ..generate import eos_ids_tensor, prefill_prompt, resolve_seed, sample_tokens
from ..kv_cache.layout import BLOCK_TOKENS
from ..kv_cache.manager import chain_hashes, snapshot_boundaries
from ..kv_cache.paged_cache import PagedCache
from ..tokenizer import TextCodec
from .handoff import StateHeader, export_state
from .request import RequestConfig, RequestError, ServingLimits, check_parameters, check_prompt_length, parse_request


def serving_limits(model_dir: str | Path, max_model_len: int | None, max_tokens_limit: int) -> ServingLimits:
    cfg = load_config(model_dir)
    context = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return ServingLimits(max_model_len=context, max_prompt_tokens=context - 1, max_tokens_limit=min(max_tokens_limit, context - 1))


class TokenizerStage:
    def __init__(self, model_dir: str | Path, limits: ServingLimits):
        self.codec = TextCodec.load(model_dir)
        self.limits = limits

    def process(self, inputs: dict[str, np.ndarray], parameters: dict | None = None) -> tuple[np.ndarray, bytes]:
        """Validated request -> (input_ids int32, request_config JSON); raises RequestError."""
        check_parameters(parameters or {})
        prompt, config, chat = parse_request(inputs, self.limits)
        try:
            ids = self.codec.encode_chat(prompt) if chat else self.codec.encode(prompt)
        except ValueError as exc:
            raise RequestError("text_input", str(exc)) from None
        check_prompt_length(len(ids), config, self.limits)
        config = replace(config, num_input_tokens=len(ids), seed=resolve_seed(config.seed), arrival_time=time.time())
        return np.asarray(ids, dtype=np.int32), config.to_json()


@dataclass
class PrefillStats:
    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # prompt tokens actually run (the rest came from the prefix cache)


class PrefillStage:
    """Runs prompts through its own model copy and exports each request's cache state.

    Prefix caching: full 256-token blocks of every prompt stay cached (LRU) after the request
    leaves; the window ring and compressor state are kept at cache points (the last block
    boundary of each prompt, and every `snapshot_interval` blocks), so a later prompt with the
    same prefix resumes at that boundary with exactly the state a cold run had there.
    """

    def __init__(self, model_dir: str | Path, device: str, dtype: torch.dtype, max_model_len: int,
                 cache_bytes: int, snapshot_slots: int = 64, snapshot_interval: int = 0, kv_format: str = "float"):
        self.model = load_model(model_dir, dtype=dtype, device=device, progress=False)
        self.cache = PagedCache.from_budget(self.model.cfg, dtype, device, cache_bytes, max_model_len,
                                            max_num_seqs=1, snapshots=snapshot_slots, kv_format=kv_format)
        self.snapshot_interval = snapshot_interval
        self.eos = eos_ids_tensor(self.model.cfg.eos_token_ids, self.model.device)
        self.stats = PrefillStats()
        self._ids = 0

    def run(self, input_ids: np.ndarray, config: RequestConfig,
            should_stop: Callable[[], bool] | None = None) -> tuple[int, StateHeader, torch.Tensor]:
        """-> (first token, header, payload); the payload lives on the model's device.

        `should_stop` (the client cancelled) is polled between chunks: `PrefillCancelled` stops the
        work early and frees the request's blocks."""
        ids = [int(t) for t in np.asarray(input_ids).reshape(-1)]
        self._ids += 1
        rid = f"prefill-{self._ids}"
        hashes = chain_hashes(ids)
        seq = self.cache.admit(rid, len(ids), hashes, prompt_len=len(ids))
        try:
            start = seq.position
            self.stats.requests += 1
            self.stats.prompt_tokens += len(ids)
            self.stats.computed_tokens += len(ids) - start
            prompt = torch.as_tensor(ids, dtype=torch.long, device=self.model.device)
            stops = [b * BLOCK_TOKENS for b in snapshot_boundaries(len(ids), self.snapshot_interval) if b * BLOCK_TOKENS > start]
            for end in [*stops, len(ids)]:
                logits = prefill_prompt(self.model, self.cache.storage, seq, prompt[seq.position:end], should_stop=should_stop)
                if end < len(ids):
                    self.cache.save_snapshot(rid, hashes)
            self.cache.publish(rid, hashes)
            token = int(sample_tokens(logits, [config.sampling()], [config.seed], [0], [config.min_tokens], self.eos)[0])
            header, payload = export_state(self.cache.storage, seq)
        finally:
            self.cache.release(rid)
        return token, header, payload
