"""Fused mHC kernels against the float32 reference (the model's reference path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4.kernels.mhc import reference as ref
from dsv4.kernels.mhc.kernel import hc_post, hc_pre
from dsv4.kernels.norm_rope.reference import rms_norm
from kernel_checks import DEVICE, REAL_SHAPES, assert_close, make_generator

DIMS = [4096] if REAL_SHAPES else [128, 200]
TOKENS = [0, 1, 7]


def _inputs(n_tok: int, d: int, dtype: torch.dtype, head: bool, seed: int):
    g = make_generator(seed)
    n = 4
    m = n if head else 2 * n + n * n
    streams = torch.randn(n_tok, n, d, generator=g).to(dtype).to(DEVICE)
    fn = (torch.randn(m, n * d, generator=g) * (n * d) ** -0.5).to(DEVICE)
    base = (torch.randn(m, generator=g) * 0.5).to(DEVICE)
    scale = (torch.rand(1 if head else 3, generator=g) + 0.5).to(DEVICE)
    weight = (torch.randn(d, generator=g) * 0.1 + 1).to(DEVICE)
    return streams, fn, base, scale, weight


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n_tok", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head", [False, True], ids=["site", "head"])
def test_hc_pre(d, n_tok, dtype, head):
    streams, fn, base, scale, weight = _inputs(n_tok, d, dtype, head, seed=d + n_tok)
    raw = F.linear(streams.flatten(1).float(), fn)
    x, post, comb = hc_pre(streams, raw, base, scale, weight, iters=20, hc_eps=1e-6, norm_eps=1e-6, head=head)
    mixes = ref.stream_mixes(streams.cpu(), fn.cpu(), 1e-6)
    if head:
        pre = ref.head_weights_ref(mixes, base.cpu(), scale.cpu(), 1e-6)
        assert post is None and comb is None
    else:
        pre, post_r, comb_r = ref.hc_weights_ref(mixes, base.cpu(), scale.cpu(), 4, 20, 1e-6)
        assert_close(post, post_r, torch.float32, "post")
        assert_close(comb, comb_r, torch.float32, "comb")
        if n_tok:
            sums = comb.sum(-1), comb.sum(-2)
            assert all(torch.allclose(s.cpu(), torch.ones_like(s.cpu()), atol=1e-3) for s in sums), "not doubly stochastic"
    expected = rms_norm(ref.hc_collapse_ref(streams.cpu(), pre), weight.cpu(), 1e-6)
    assert_close(x, expected, dtype, "collapsed input")


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hc_post(d, dtype):
    streams, fn, base, scale, _ = _inputs(5, d, dtype, False, seed=7)
    _, post, comb = ref.hc_weights_ref(ref.stream_mixes(streams, fn, 1e-6), base, scale, 4, 20, 1e-6)
    y = torch.randn(5, d, generator=make_generator(8)).to(dtype).to(DEVICE)
    out, flat = hc_post(streams, y, post.contiguous(), comb.contiguous(), flat=True)
    assert torch.equal(flat, out.float().flatten(1)), "the float32 flattening must be the streams' exact values"
    expected = ref.hc_expand_ref(streams.cpu(), y.cpu(), post.cpu(), comb.cpu())
    if dtype == torch.bfloat16:  # the kernel rounds exactly where the bf16 ops round
        assert torch.equal(out.cpu(), expected)
    assert_close(out, expected, dtype, "expanded streams")
