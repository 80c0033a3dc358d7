"""`dsv4-generate --tensor-parallel N --expert-parallel M` equals the one-process command, and bad
combinations stop before any process starts, naming the option."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv4.scripts.generate import main

from .workload import one_thread

PROMPT = "0,100,200,300,7,11,13"


def test_parallel_command_equals_one_process(tiny_dir, tmp_path, capfd):
    common = ["--model", str(tiny_dir), "--input-ids", PROMPT, "--max-tokens", "3", "--json"]
    with one_thread():
        assert main([*common, "--dump-logits", str(tmp_path / "one.npy")]) == 0
    single = json.loads(capfd.readouterr().out)
    parallel = ["--tensor-parallel", "2", "--expert-parallel", "2", "--dump-logits", str(tmp_path / "split.npy")]
    assert main([*common, *parallel]) == 0
    split = json.loads(capfd.readouterr().out)  # printed once, by this command, from rank 0's result
    assert split["token_ids"] == single["token_ids"] and split["text"] == single["text"]
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "split.npy")
    assert one.shape == two.shape == (len(PROMPT.split(",")), 129280)
    assert np.abs(one - two).max() <= 1e-5


@pytest.mark.parametrize("options,message", [
    (["--tensor-parallel", "3"], "--tensor-parallel 3: the model's 4 attention heads"),
    (["--expert-parallel", "3"], "--expert-parallel 3: the model's 8 routed experts"),
    (["--tensor-parallel", "2", "--expert-parallel", "4"], "each must be 1 or equal to the other"),
    (["--tensor-parallel", "0"], "--tensor-parallel 0: must be a positive integer"),
    (["--tensor-parallel", "2", "--device", "cuda:1"], "need one GPU per rank: 2 ranks"),
])
def test_bad_combinations_are_refused(tiny_dir, capsys, options, message):
    assert main(["--model", str(tiny_dir), "--input-ids", PROMPT, *options]) == 2
    assert message in capsys.readouterr().err
