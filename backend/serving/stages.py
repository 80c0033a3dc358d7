"""The tokenizer and prefill stages, free of Triton types (the model.py adapters convert tensors)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.loader import load_model
from ..config import load_config
from ..generate import prefill_prompt, resolve_seed, sample_tokens
from ..kv_cache.allocator import SimpleAllocator, pool_sizes_for
from ..kv_cache.storage import KVStorage
from ..tokenizer import TextCodec
from .handoff import StateHeader, export_state
from .request import RequestConfig, RequestError, ServingLimits, check_prompt_length, parse_request


def serving_limits(model_dir: str | Path, max_model_len: int | None, max_tokens_limit: int) -> ServingLimits:
    cfg = load_config(model_dir)
    context = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return ServingLimits(max_model_len=context, max_prompt_tokens=context - 1, max_tokens_limit=min(max_tokens_limit, context - 1))


class TokenizerStage:
    def __init__(self, model_dir: str | Path, limits: ServingLimits):
        self.codec = TextCodec.load(model_dir)
        self.limits = limits

    def process(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, bytes]:
        """Validated request -> (input_ids int32, request_config JSON); raises RequestError."""
        prompt, config, chat = parse_request(inputs, self.limits)
        try:
            ids = self.codec.encode_chat(prompt) if chat else self.codec.encode(prompt)
        except ValueError as exc:
            raise RequestError("text_input", str(exc)) from None
        check_prompt_length(len(ids), config, self.limits)
        config = replace(config, num_input_tokens=len(ids), seed=resolve_seed(config.seed))
        return np.asarray(ids, dtype=np.int32), config.to_json()


class PrefillStage:
    """Runs prompts through its own model copy and exports each request's cache state."""

    def __init__(self, model_dir: str | Path, device: str, dtype: torch.dtype, max_prompt_tokens: int):
        self.model = load_model(model_dir, dtype=dtype, device=device, progress=False)
        self.storage = KVStorage(self.model.cfg, pool_sizes_for(1, max_prompt_tokens + 1), dtype, device)
        self.alloc = SimpleAllocator(self.storage)
        self.eos = sorted(self.model.cfg.eos_token_ids)

    def run(self, input_ids: np.ndarray, config: RequestConfig) -> tuple[int, StateHeader, torch.Tensor]:
        """-> (first token, header, payload); the payload lives on the model's device."""
        seq = self.alloc.new_sequence(len(input_ids))
        try:
            prompt = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=self.model.device)
            logits = prefill_prompt(self.model, self.storage, seq, prompt)
            banned = [self.eos] if config.min_tokens > 0 else None
            token = int(sample_tokens(logits, [config.sampling()], [config.seed], [0], banned)[0])
            header, payload = export_state(self.storage, seq)
        finally:
            self.alloc.release(seq)
        return token, header, payload
