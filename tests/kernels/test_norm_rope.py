"""Fused norm + RoPE (+ ring write) kernels against the float32 reference."""

from __future__ import annotations

import pytest
import torch

from dsv4.backend.kv_cache.pools import PagedPool
from dsv4.kernels.norm_rope.kernel import head_norm_rope, kv_norm_rope, rms_norm_rows
from dsv4.kernels.norm_rope.reference import apply_rope, head_rms_norm, rms_norm, rope_cos_sin
from kernel_checks import DEVICE, REAL_SHAPES, assert_close, make_generator, rope_inv_freq

HEADS, DIM = (64, 512) if REAL_SHAPES else (4, 128)
POSITIONS = [0, 5, 127, 1000, 1048575]


def _rows(n_extra: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = make_generator(seed)
    # a slice of a wider tensor, as the fused GEMM's output is
    return torch.randn(len(POSITIONS), HEADS * DIM + n_extra, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "rope_only"])
def test_head_norm_rope(dtype, normalize):
    wide = _rows(77, dtype, seed=1)
    x = wide[:, : HEADS * DIM]
    pos = torch.tensor(POSITIONS, device=DEVICE)
    inv = rope_inv_freq(64)
    out = head_norm_rope(x, pos, inv, num_heads=HEADS, normalize=normalize)
    cos, sin = rope_cos_sin(pos.cpu(), inv.cpu())
    heads = x.cpu().reshape(len(POSITIONS), HEADS, DIM)
    expected = apply_rope(head_rms_norm(heads, 1e-6) if normalize else heads, cos.unsqueeze(1), sin.unsqueeze(1))
    assert_close(out, expected, dtype, "queries")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("store", ["tensor", "float", "main_fp8"])
def test_kv_norm_rope(dtype, store):
    x = _rows(0, dtype, seed=2)[:, :DIM]
    pos = torch.tensor(POSITIONS, device=DEVICE)
    inv = rope_inv_freq(64)
    weight = (torch.randn(DIM, generator=make_generator(3)) * 0.1 + 1).to(DEVICE)
    cos, sin = rope_cos_sin(pos.cpu(), inv.cpu())
    expected = apply_rope(rms_norm(x.cpu(), weight.cpu(), 1e-6), cos, sin)
    if store == "tensor":
        assert_close(kv_norm_rope(x, pos, inv, weight), expected, dtype, "kv")
        return
    window = 16
    ring = PagedPool(6, window, DIM, store, dtype, DEVICE, 64)
    want = PagedPool(6, window, DIM, store, dtype, torch.device("cpu"), 64)
    blocks = torch.tensor([2, 1, 5, 3, 4], dtype=torch.int32, device=DEVICE)
    kv_norm_rope(x, pos, inv, weight, ring=ring.tensor, ring_blocks=blocks, window=window)
    want.write(blocks.long().cpu(), pos.cpu() % window, expected)
    got, ref_pages = ring.read_pages(blocks.long()).float().cpu(), want.read_pages(blocks.long().cpu()).float()
    assert_close(got, ref_pages, torch.float32 if store == "main_fp8" else dtype, f"ring {store}")


@pytest.mark.parametrize("d", [64, 1000] + ([1536] if REAL_SHAPES else []))
def test_rms_norm_rows(d):
    g = make_generator(d)
    x = torch.randn(5, d + 9, generator=g).to(torch.bfloat16).to(DEVICE)[:, :d]
    w = (torch.randn(d, generator=g) * 0.1 + 1).to(DEVICE)
    assert_close(rms_norm_rows(x, w), rms_norm(x.cpu(), w.cpu(), 1e-6), torch.bfloat16, "rms_norm_rows")
