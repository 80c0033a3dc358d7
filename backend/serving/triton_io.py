"""Conversions between Triton Python-backend objects and plain arrays, shared by the adapters.

`pb` is the `triton_python_backend_utils` module, passed in by the adapter: it only exists
inside the backend stub, so nothing here imports it.
"""

from __future__ import annotations

import json
import subprocess
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


def watch_parent(parent_pid: int, stub_pid: int) -> subprocess.Popen:
    """A shell that kills this stub if tritonserver dies first.

    A stub whose server is gone can hang forever inside an IPC call that holds the GIL (seen with
    custom-metric updates), so the guard must live outside this Python process.
    """
    script = (f"while kill -0 {parent_pid} 2>/dev/null; do kill -0 {stub_pid} 2>/dev/null || exit 0; sleep 1; done; "
              f"kill -9 {stub_pid} 2>/dev/null")
    return subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
