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


def test_rank_results_come_back_on_the_cpu():
    """A GPU rank's result is moved to the CPU before it is saved: every tensor, inside lists, tuples,
    dicts and dataclasses (a stand-in tensor records the move)."""
    from dataclasses import dataclass

    from dsv4.backend.parallel.launch import _on_cpu

    moved = []

    class OnDevice(torch.Tensor):
        def cpu(self, *args, **kwargs):
            moved.append(self.shape)
            return torch.Tensor(super().cpu(*args, **kwargs))

    @dataclass(frozen=True)
    class Out:
        ids: list
        logits: torch.Tensor

    out = _on_cpu({"a": [Out([1, 2], torch.ones(2).as_subclass(OnDevice))], "b": (torch.zeros(3).as_subclass(OnDevice), "text")})
    assert sorted(moved) == [(2,), (3,)]
    assert type(out["a"][0].logits) is torch.Tensor and out["a"][0].ids == [1, 2] and out["b"][1] == "text"
