"""dsv4-checkpoint and dsv4-generate as a user runs them (subprocesses)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

SMALL = ["--set", "num_layers=3", "--set", 'layer_types=["sliding_attention","compressed_sparse_attention","heavily_compressed_attention"]',
         "--set", 'mlp_types=["hash_moe","moe","moe"]', "--quiet"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"dsv4.scripts.{module}", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    result = _run("make_checkpoint", "tiny", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr
    return out


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_checkpoint_is_seeded_and_complete(small_ckpt, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (small_ckpt / name).is_file()
    config = json.loads((small_ckpt / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["vocab_size"] == 129280
    again = tmp_path / "again"
    assert _run("make_checkpoint", "tiny", "--out", str(again), *SMALL).returncode == 0
    assert _digest(again) == _digest(small_ckpt)
    other = tmp_path / "other"
    assert _run("make_checkpoint", "tiny", "--out", str(other), "--seed", "1", *SMALL).returncode == 0
    assert _digest(other) != _digest(small_ckpt)


def test_checkpoint_rejects_bad_overrides(tmp_path):
    result = _run("make_checkpoint", "tiny", "--out", str(tmp_path / "x"), "--set", "num_heads=0")
    assert result.returncode == 2 and "num_heads" in result.stderr
    result = _run("make_checkpoint", "tiny", "--out", str(tmp_path / "x"), "--set", "no_such_field=1")
    assert result.returncode == 2 and "no_such_field" in result.stderr


def test_generate_json_and_logits_dump(small_ckpt, tmp_path):
    dump = tmp_path / "logits.npy"
    result = _run("generate", "--model", str(small_ckpt), "--input-ids", "0,100,200,300,7", "--max-tokens", "6",
                  "--json", "--dump-logits", str(dump))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 6 and isinstance(out["text"], str)
    logits = np.load(dump)
    assert logits.shape == (5, 129280) and logits.dtype == np.float32 and np.isfinite(logits).all()
    # greedy: the first generated token is the argmax of the last prompt position
    assert out["token_ids"][0] == int(logits[-1].argmax())
    again = json.loads(_run("generate", "--model", str(small_ckpt), "--input-ids", "0,100,200,300,7", "--max-tokens", "6",
                            "--json").stdout)
    assert again["token_ids"] == out["token_ids"]


def test_generate_rejects_bad_input(small_ckpt):
    result = _run("generate", "--model", str(small_ckpt), "--input-ids", "0,999999", "--json")
    assert result.returncode == 2 and "vocabulary" in result.stderr
    result = _run("generate", "--model", str(small_ckpt), "--prompt", "hi", "--top-p", "2")
    assert result.returncode == 2 and "top_p" in result.stderr
