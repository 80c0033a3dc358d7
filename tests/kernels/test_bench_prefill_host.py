"""`scripts/bench_prefill_host.py`: a pass over several prompts launches the sparse attention once per
layer, and the hash table has a row per length."""

from __future__ import annotations

import json

from dsv4.backend import presets
from dsv4.scripts import bench_prefill_host


def test_a_pass_of_three_prompts_launches_attention_once_per_layer(tmp_path):
    out = tmp_path / "host.json"
    assert bench_prefill_host.main(["--prompts", "3", "--hash-tokens", "1024", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["launches"]
    assert row["prompts"] == 3
    assert row["by_kernel"]["sparse_attn_fwd_kernel"] == presets.preset("tiny").num_layers
    assert report["hashes"][0]["tokens"] == 1024 and report["hashes"][0]["array_ms"] > 0
