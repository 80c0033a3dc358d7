from __future__ import annotations

import json

import pytest

from dsv4.backend.kv_cache.layout import KINDS, KVLayout
from dsv4.backend.kv_cache.manager import KVCacheManager
from dsv4.backend.presets import preset
from dsv4.scripts.kv_report import main


def _run(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("index", "theory"), [("fp8", 4_040_494_080), ("fp4", 3_688_172_544)], ids=["fp8-index", "fp4-index"]
)
def test_flash_1m_against_theory(capsys, index, theory):
    r = _run(capsys, "--preset", "flash", "--context", "1048576", "--index-dtype", index)
    assert r["theory_total_bytes"] == theory
    assert r["total_bytes"] <= 1.03 * theory
    assert r["ratio"] == pytest.approx(r["total_bytes"] / theory)
    assert r["fixed_bytes_per_request"] == 43 * 128 * 584 + 21 * 15360 + 20 * 6144
    assert set(r["per_kind"]) == set(KINDS)
    assert sum(k["bytes"] for k in r["per_kind"].values()) == r["total_bytes"]
    assert sum(k["theory_bytes"] for k in r["per_kind"].values()) == theory
    assert r["per_kind"]["csa_kv"]["blocks"] == 4096
    # each request slot also pays one snapshot slot (a ring + accumulators copy)
    per_slot = r["total_bytes"] + r["fixed_bytes_per_request"]
    assert r["requests_in_budget"] == 80 * (1 << 30) // per_slot == (21 if index == "fp8" else 23)


def test_bytes_held_matches_report(capsys):
    tokens = 5000
    r = _run(capsys, "--preset", "tiny", "--context", str(tokens), "--budget-gib", "1")
    layout = KVLayout.from_config(preset("tiny"))
    mgr = KVCacheManager.from_budget(layout, 1 << 30, 8192)
    mgr.admit("req", tokens)
    assert mgr.bytes_held("req") == r["total_bytes"]
    assert {k: len(mgr.blocks("req").table(k)) for k in KINDS} == {k: v["blocks"] for k, v in r["per_kind"].items()}


def test_budget_too_small_fits_none(capsys):
    r = _run(capsys, "--preset", "flash", "--budget-gib", "2")
    assert r["requests_in_budget"] == 0


def test_table_output_and_model_dir(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset("flash-mini").to_transformers_dict()))
    assert main(["--model", str(tmp_path), "--context", "4096", "--format", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "csa_index" in out and "bf16" in out


def test_bad_inputs(capsys, tmp_path):
    assert main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--context", "0"])
    with pytest.raises(SystemExit):
        main(["--preset", "flash", "--model", str(tmp_path)])
