"""Read a running server's Prometheus text (`/metrics`): Triton's per-model `nv_inference_*` counters
and the stages' own, as {(name, labels): value}, and the per-model cost of a stretch of work."""

from __future__ import annotations

import re
import urllib.request

Sample = tuple[str, tuple[tuple[str, str], ...]]
# Triton's per-model counters: what each step of the ensemble did, and how long it took
MODEL_COUNTERS = ("nv_inference_request_success", "nv_inference_exec_count", "nv_inference_queue_duration_us",
                  "nv_inference_compute_infer_duration_us")
STAGE_COUNTERS = ("dsv4_decode_steps_total", "dsv4_decode_responses_total", "vllm:generation_tokens_total")


def scrape(metrics_url: str, timeout_s: float = 5.0) -> dict[Sample, float]:
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        out[(name, tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels))))] = float(value)
    return out


def total(samples: dict[Sample, float], name: str) -> float:
    """One metric summed over its label sets (0 when it is not exported yet)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def model_costs(before: dict[Sample, float], after: dict[Sample, float]) -> dict:
    """Per model, over the stretch between two scrapes: requests, executions, mean queue and execute
    time per request (µs); plus decode's steps and responses and the tokens generated."""
    per_model: dict[str, dict[str, float]] = {}
    for (name, labels), value in after.items():
        if name in MODEL_COUNTERS:
            model = dict(labels).get("model", "?")
            per_model.setdefault(model, {})[name] = value - before.get((name, labels), 0.0)
    models = {}
    for model, c in sorted(per_model.items()):
        requests = c.get("nv_inference_request_success", 0.0)
        models[model] = {
            "requests": requests, "executions": c.get("nv_inference_exec_count", 0.0),
            "queue_us_per_request": c.get("nv_inference_queue_duration_us", 0.0) / requests if requests else None,
            "compute_us_per_request": c.get("nv_inference_compute_infer_duration_us", 0.0) / requests if requests else None,
        }
    stages = {name: total(after, name) - total(before, name) for name in STAGE_COUNTERS}
    return {"models": models, **stages}
