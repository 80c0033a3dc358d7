"""Conversions between Triton Python-backend objects and plain arrays, shared by the adapters.

`pb` is the `triton_python_backend_utils` module, passed in by the adapter: it only exists
inside the backend stub, so nothing here imports it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .text_state import OutputChunk

REQUEST_INPUTS = ("text_input", "max_tokens", "min_tokens", "stream", "temperature", "top_p", "top_k", "seed",
                  "stop_words", "exclude_input_in_output", "apply_chat_template")
OUTPUT_NAMES = ("text_output", "output_ids", "finish_reason", "num_input_tokens", "num_output_tokens")


def model_parameters(args: dict) -> dict[str, str]:
    """The `parameters { key value }` of config.pbtxt as a plain dict of strings."""
    params = json.loads(args["model_config"]).get("parameters", {})
    return {k: v["string_value"] for k, v in params.items()}


def read_inputs(pb: Any, request: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def error_response(pb: Any, code: str, message: str) -> Any:
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, getattr(pb.TritonError, code)))


def chunk_tensors(pb: Any, chunk: OutputChunk, stream_ref: int | None = None) -> list[Any]:
    tensors = [
        pb.Tensor("text_output", np.array([chunk.text.encode("utf-8")], dtype=np.object_)),
        pb.Tensor("output_ids", np.asarray(chunk.token_ids, dtype=np.int32)),
        pb.Tensor("finish_reason", np.array([chunk.finish_reason.encode()], dtype=np.object_)),
        pb.Tensor("num_input_tokens", np.array([chunk.num_input_tokens], dtype=np.int32)),
        pb.Tensor("num_output_tokens", np.array([chunk.num_output_tokens], dtype=np.int32)),
    ]
    if stream_ref is not None:
        tensors.append(pb.Tensor("stream_ref", np.array([stream_ref], dtype=np.int64)))
    return tensors
