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


@pytest.mark.parametrize("fixed", [True, False])
def test_both_tools_ask_for_the_same_output_length(tmp_path, fixed):
    from dsv4.scripts.compare_aiperf_locust import write_dataset
    from load_tests.scenario import load_scenario

    dataset, locust_file, system, extra = write_dataset("short_chat", tmp_path, fixed)
    lines = dataset.read_text().splitlines()
    (spec,) = load_scenario(str(locust_file)).requests
    assert system and len(lines) == len(spec.prompt.texts) and extra["temperature"] == 0.0
    if fixed:  # AIPerf's extra inputs and Locust's scenario both pin the length
        assert extra["min_tokens"] == spec.max_tokens == spec.min_tokens == 64
    else:
        assert "min_tokens" not in extra and spec.min_tokens is None


def test_a_scenario_refuses_min_tokens_above_max_tokens():
    from load_tests.scenario import scenario_from_dict

    with pytest.raises(ValueError, match="min_tokens"):
        scenario_from_dict({"name": "x", "requests": [{"name": "r", "max_tokens": 4, "min_tokens": 5,
                                                        "prompt": {"kind": "list", "texts": ["a"]}}]})
