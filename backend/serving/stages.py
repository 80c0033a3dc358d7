"""The tokenizer stage and the serving limits, free of Triton types (the model.py adapter converts tensors)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import load_config
from ..generate import resolve_seed
from ..tokenizer import TextCodec
from .request import RequestError, ServingLimits, check_parameters, check_prompt_length, parse_request


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
