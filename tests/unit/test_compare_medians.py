"""compare_aiperf_locust judges several rounds by each level's medians: one run slowed by the
machine moves a mean, not a median."""

from __future__ import annotations

import pytest

from dsv4.scripts.compare_aiperf_locust import medians


def _row(users: int, round_index: int, ttft: tuple[float, float], itl: tuple[float, float]) -> dict:
    tools = {tool: {"ttft": {"avg": ttft[i]}, "itl": {"avg": itl[i]}} for i, tool in enumerate(("locust", "aiperf"))}
    return {"users": users, "round": round_index, **tools}


def test_medians_per_level_ignore_one_drifted_round():
    rows = [_row(1, 1, (50, 52), (27, 27.5)), _row(4, 1, (110, 150), (42, 44)),
            _row(1, 2, (51, 80), (27, 31)), _row(4, 2, (112, 114), (43, 43)),
            _row(1, 3, (49, 50), (28, 27)), _row(4, 3, (170, 116), (58, 42))]
    one, four = medians(rows)
    assert (one["users"], one["rounds"], four["users"]) == (1, 3, 4)
    assert one["ttft_locust"] == 50 and one["ttft_aiperf"] == 52 and one["ttft_diff"] == pytest.approx(0.04)
    assert four["ttft_locust"] == 112 and four["ttft_aiperf"] == 116 and abs(four["itl_diff"]) < 0.03
