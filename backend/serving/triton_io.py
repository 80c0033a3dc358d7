"""Conversions between Triton Python-backend objects and plain arrays, shared by the adapters.

`pb` is the `triton_python_backend_utils` module, passed in by the adapter: it only exists
inside the backend stub, so nothing here imports it.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import numpy as np

from .request import INPUT_NAMES, RequestError
from .text_state import OutputChunk

REQUEST_INPUTS = INPUT_NAMES
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


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def instance_device(args: dict, params: dict[str, str]) -> str:
    """The device this model instance runs on: Triton does not set one for Python models."""
    device = params["device"]
    return f"cuda:{args.get('model_instance_device_id', '0')}" if device == "cuda" else device


def memory_fraction(params: dict[str, str], device: str) -> float:
    """This instance's share of its GPU: `memory_fraction` is one number, or "gpu=fraction,..." for a
    model with instances on several GPUs (dsv4-serve --prefill-gpus)."""
    value = params["memory_fraction"]
    if "=" not in value:
        return float(value)
    shares = dict(item.split("=") for item in value.split(","))
    gpu = device.split(":")[1] if ":" in device else "0"
    if gpu not in shares:
        raise ValueError(f"memory_fraction {value!r} has no share for GPU {gpu}")
    return float(shares[gpu])


def compute_dtype(params: dict[str, str]) -> Any:
    import torch

    return getattr(torch, DTYPES[params["dtype"]])


def request_parameters(request: Any) -> dict[str, Any]:
    try:
        raw = request.parameters()
    except UnicodeDecodeError as exc:  # the backend decodes the parameters' JSON text as UTF-8
        raise RequestError("parameters", f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return json.loads(raw) if raw else {}


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


class MetricSet:
    """Triton custom metrics by name and labels; gauges and counters only send changes (each
    update is an IPC round trip). Silently inert when the server runs with metrics disabled."""

    def __init__(self, pb: Any, spec: dict[str, tuple[str, str]], buckets: dict[str, list[float]] | None = None):
        kinds = {"counter": pb.MetricFamily.COUNTER, "gauge": pb.MetricFamily.GAUGE, "histogram": pb.MetricFamily.HISTOGRAM}
        self.buckets = buckets or {}
        self.metrics: dict[tuple, Any] = {}
        self.last: dict[tuple, float] = {}
        try:
            self.families = {name: pb.MetricFamily(name, help_text, kinds[kind]) for name, (kind, help_text) in spec.items()}
        except Exception:
            self.families = None

    def _metric(self, name: str, labels: dict[str, str]) -> Any:
        key = (name, tuple(sorted(labels.items())))
        if key not in self.metrics:
            kwargs = {"buckets": self.buckets[name]} if name in self.buckets else {}
            self.metrics[key] = self.families[name].Metric(labels=labels, **kwargs)
        return key, self.metrics[key]

    def set(self, name: str, value: float, **labels: str) -> None:
        if self.families is None:
            return
        key, metric = self._metric(name, labels)
        if self.last.get(key) != value:
            metric.set(value)
            self.last[key] = value

    def total(self, name: str, value: float, **labels: str) -> None:
        """Bring a counter up to a cumulative `value` (sends only the increase)."""
        if self.families is None:
            return
        key, metric = self._metric(name, labels)
        delta = value - self.last.get(key, 0)
        if delta > 0:
            metric.increment(delta)
            self.last[key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        if self.families is not None:
            self._metric(name, labels)[1].observe(value)


KV_METRICS = {
    "dsv4_kv_blocks_used": ("gauge", "KV-cache blocks held by live requests, per stage and pool"),
    "dsv4_kv_blocks_free": ("gauge", "KV-cache blocks free or reclaimable, per stage and pool"),
    "dsv4_kv_blocks_cached": ("gauge", "Freed KV-cache blocks kept for prefix reuse, per stage and pool"),
    "dsv4_gpu_memory_bytes": ("gauge", "GPU memory of a stage sized from measurement, by part: share, weights, working, kv"),
}


def report_memory_split(metrics: MetricSet, split) -> None:
    """Once at start-up: how the stage's share of the GPU was split (`gpu_memory.MemorySplit`)."""
    for part, value in split.parts().items():
        metrics.set("dsv4_gpu_memory_bytes", value, stage=split.stage, part=part)


def report_kv_usage(metrics: MetricSet, stage: str, usage: dict) -> None:
    for pool, u in usage.items():
        metrics.set("dsv4_kv_blocks_used", u.used, stage=stage, pool=pool)
        metrics.set("dsv4_kv_blocks_free", u.free, stage=stage, pool=pool)
        metrics.set("dsv4_kv_blocks_cached", u.cached, stage=stage, pool=pool)
