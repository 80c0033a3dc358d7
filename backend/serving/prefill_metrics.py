"""Prefill's Prometheus metrics, reported by whichever Triton model runs the prefill engine (its own
stage, or decode's process when both stages share one)."""

from __future__ import annotations

from .prefill_engine import PrefillEngine
from .triton_io import MetricSet, report_kv_usage

PREFILL_METRICS = {
    "dsv4_prefix_cache_hits_total": ("counter", "Prompts that resumed from a cached prefix"),
    "dsv4_prefix_cache_misses_total": ("counter", "Prompts with a full block but no cached prefix"),
    "dsv4_prefix_cache_hit_tokens_total": ("counter", "Prompt tokens taken from the prefix cache"),
    "dsv4_prefill_prompt_tokens_total": ("counter", "Prompt tokens received by prefill"),
    "dsv4_prefill_computed_tokens_total": ("counter", "Prompt tokens prefill actually ran"),
    "dsv4_prefill_steps_total": ("counter", "Batched prefill passes through the model"),
    "dsv4_prefill_step_prompts": ("histogram", "Prompts advanced together in one prefill pass"),
    "dsv4_prefill_step_tokens": ("histogram", "Prompt tokens run in one prefill pass"),
    "dsv4_prefill_requests": ("gauge", "Prompts in prefill, running or waiting"),
}
PREFILL_BUCKETS = {
    "dsv4_prefill_step_prompts": [1, 2, 4, 8, 16, 32, 64],
    "dsv4_prefill_step_tokens": [64, 256, 1024, 4096, 16384, 65536],
}


def report_prefill(m: MetricSet, engine: PrefillEngine) -> None:
    manager, stats = engine.stage.cache.manager, engine.stage.stats
    m.total("dsv4_prefix_cache_hits_total", manager.prefix_hits)
    m.total("dsv4_prefix_cache_misses_total", manager.prefix_misses)
    m.total("dsv4_prefix_cache_hit_tokens_total", manager.prefix_hit_tokens)
    m.total("dsv4_prefill_prompt_tokens_total", stats.prompt_tokens)
    m.total("dsv4_prefill_computed_tokens_total", stats.computed_tokens)
    m.total("dsv4_prefill_steps_total", stats.steps)
    m.set("dsv4_prefill_requests", engine.held_requests())
    while engine.step_sizes:
        prompts, tokens = engine.step_sizes.popleft()
        m.observe("dsv4_prefill_step_prompts", prompts)
        m.observe("dsv4_prefill_step_tokens", tokens)
    report_kv_usage(m, "prefill", manager.usage())
