from __future__ import annotations

from dataclasses import replace

import pytest

from dsv4.backend.kv_cache.layout import (
    KINDS,
    KVLayout,
    LayoutError,
    StorageFormat,
    index_key_bytes,
    main_entry_bytes,
)
from dsv4.backend.presets import preset

M = 1048576
GIB = 1 << 30


@pytest.fixture(scope="module")
def flash():
    return preset("flash")


def test_entry_sizes_at_v4_shapes(flash):
    assert main_entry_bytes(flash, "fp8") == 584
    assert main_entry_bytes(flash, "bf16") == 1024
    assert main_entry_bytes(flash, "fp32") == 2048
    assert index_key_bytes(flash, "fp8") == 132
    assert index_key_bytes(flash, "fp4") == 68
    assert index_key_bytes(flash, "bf16") == 256
    fmt = StorageFormat.named(flash, "bf16")
    assert (fmt.main_entry_bytes, fmt.index_key_bytes, fmt.name) == (1024, 256, "bf16+bf16")
    assert StorageFormat.named(flash).name == "fp8+fp8"


def test_unknown_format_is_named(flash):
    with pytest.raises(LayoutError, match="fp16"):
        StorageFormat.named(flash, "fp16")
    with pytest.raises(LayoutError, match="int4"):
        StorageFormat.named(flash, "fp8", "int4")


def test_flash_kinds(flash):
    layout = KVLayout.from_config(flash, "fp8")
    assert layout.present == KINDS
    counts = {k.kind: (k.num_layers, k.entries_per_block, k.page_bytes[0]) for k in layout.kinds}
    assert counts == {
        "swa": (43, 128, 128 * 584),
        "csa_kv": (21, 64, 64 * 584),
        "csa_index": (21, 64, 64 * 132),
        "hca_kv": (20, 2, 2 * 584),
        "state": (41, 1, 2 * 3 * (512 + 128) * 4),
    }
    state = layout.kind("state")
    assert state.block_bytes == 21 * 15360 + 20 * 6144
    assert layout.kind("swa").block_bytes == 43 * 128 * 584


@pytest.mark.parametrize(
    ("index", "expected"), [("fp8", 4_040_494_080), ("fp4", 3_688_172_544)], ids=["fp8-index", "fp4-index"]
)
def test_flash_theory_at_1m(flash, index, expected):
    layout = KVLayout.from_config(flash, StorageFormat.named(flash, "fp8", index))
    assert layout.theory_total_bytes(M) == expected
    held = layout.request_bytes(M)
    # the only bytes above theory are the fp32 accumulators
    assert held.total - expected == layout.kind("state").block_bytes
    assert held.total <= 1.03 * expected


@pytest.mark.parametrize(
    ("name", "main", "index", "gib"),
    [
        ("flash", "bf16", None, 6.72),
        ("pro", "fp8", "fp8", 5.39),
        ("pro", "fp8", "fp4", 4.92),
        ("pro", "bf16", None, 9.62),
    ],
    ids=["flash-bf16", "pro-fp8", "pro-fp4", "pro-bf16"],
)
def test_published_totals(name, main, index, gib):
    cfg = preset(name)
    layout = KVLayout.from_config(cfg, StorageFormat.named(cfg, main, index))
    assert round(layout.theory_total_bytes(M) / GIB, 2) == gib


@pytest.mark.parametrize(
    ("tokens", "csa", "hca"),
    [
        (0, 0, 0), (1, 0, 0), (3, 0, 0), (4, 1, 0), (127, 1, 0), (128, 1, 1),
        (256, 1, 1), (259, 1, 1), (260, 2, 1), (511, 2, 2),
    ],
)
def test_blocks_for_tokens_edges(flash, tokens, csa, hca):
    blocks = KVLayout.from_config(flash).blocks_for_tokens(tokens)
    assert (blocks.swa, blocks.state) == (1, 1)
    assert (blocks.csa_kv, blocks.csa_index, blocks.hca_kv) == (csa, csa, hca)


def test_tiny_rates_and_bytes():
    tiny = preset("tiny")
    layout = KVLayout.from_config(tiny)
    assert layout.kind("hca_kv").entries_per_block == 256 // 32
    assert layout.blocks_for_tokens(31).hca_kv == 0
    assert layout.blocks_for_tokens(32).hca_kv == 1
    held = layout.request_bytes(1000)
    bb = layout.block_bytes
    assert held.per_kind.csa_kv == 4 * bb.csa_kv
    assert held.fixed == bb.swa + bb.state
    assert held.fixed + held.growing == held.total == sum(held.per_kind)


def test_theory_split_matches_spec_formula(flash):
    layout = KVLayout.from_config(flash)
    t, e, ei = 100_000, 584, 132
    by_layer_type = 2 * 128 * e + 21 * ((128 + t // 4) * e + t // 4 * ei) + 20 * (128 + t // 128) * e
    assert layout.theory_total_bytes(t) == by_layer_type
    assert layout.theory_bytes(t).state == 0


@pytest.mark.parametrize("field", ["csa_rate", "hca_rate"])
def test_rate_must_divide_block(field):
    cfg = replace(preset("tiny"), **{field: 3})
    with pytest.raises(LayoutError, match=field):
        KVLayout.from_config(cfg)


def test_model_without_compressed_layers_has_no_state():
    tiny = preset("tiny")
    cfg = replace(tiny, layer_types=("sliding_attention",) * tiny.num_layers)
    layout = KVLayout.from_config(cfg)
    assert layout.present == ("swa",)
    assert layout.blocks_for_tokens(10_000) == (1, 0, 0, 0, 0)


def test_negative_tokens_rejected(flash):
    with pytest.raises(ValueError, match="num_tokens"):
        KVLayout.from_config(flash).blocks_for_tokens(-1)
