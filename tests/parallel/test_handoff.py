"""A request's cache state moves between two processes (two CPU "devices") over gloo byte for byte,
into other block ids, and decoding continues there exactly as where it was prefilled."""

from __future__ import annotations

import torch

from dsv4.backend.parallel.launch import spawn_ranks

from .workload import hand_off


def test_state_handoff_between_processes_is_byte_exact(tiny_dir):
    sent, imported = spawn_ranks(hand_off, 2, str(tiny_dir), threads=1)
    assert imported["blocks"] != sent["blocks"]
    assert imported["header"] == sent["header"]
    assert sent["payload"].dtype == torch.uint8 and sent["payload"].count_nonzero() > 0
    assert torch.equal(imported["payload"], sent["payload"])
    assert torch.equal(imported["logits"], sent["logits"])
