"""MoE kernels against the float32 reference, and the grouped MoE path against the per-expert loop."""

from __future__ import annotations

import pytest
import torch

from dsv4.backend import presets
from dsv4.backend.config import HASH_MOE, ROUTED_MOE
from dsv4.backend.model.moe import MoE
from dsv4.kernels.moe import reference as ref
from dsv4.kernels.moe.kernel import moe_combine, moe_route, swiglu
from kernel_checks import DEVICE, REAL_SHAPES, assert_close, make_generator

EXPERTS = [256] if REAL_SHAPES else [8, 19]


@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("hashed", [False, True], ids=["scored", "hashed"])
def test_moe_route(experts, hashed):
    g = make_generator(experts)
    n, k = 11, 6 if experts >= 8 else 2
    logits = (torch.randn(n, experts, generator=g) * 3).to(DEVICE)
    logits[0, :] = -30.0  # softplus underflow region
    bias = (torch.randn(experts, generator=g) * 0.1).to(DEVICE)
    tid2eid = torch.rand(50, experts, generator=g).argsort(1)[:, :k].contiguous().to(DEVICE)
    tokens = torch.randint(0, 50, (n,), generator=g).to(DEVICE)
    if hashed:
        w, ids = moe_route(logits, k, 1.5, tid2eid=tid2eid, token_ids=tokens)
        w_ref, ids_ref = ref.route_ref(logits.cpu(), None, tid2eid.cpu()[tokens.cpu()], k, 1.5)
    else:
        w, ids = moe_route(logits, k, 1.5, bias=bias)
        w_ref, ids_ref = ref.route_ref(logits.cpu(), bias.cpu(), None, k, 1.5)
    ids, w = ids.cpu().long(), w.cpu()
    assert (ids[:, k] == experts).all() and (w[:, k] == 1).all(), "shared-expert column"
    order, order_ref = ids[:, :k].argsort(1), ids_ref.argsort(1)
    assert torch.equal(ids[:, :k].gather(1, order), ids_ref.gather(1, order_ref))
    assert_close(w[:, :k].gather(1, order), w_ref.gather(1, order_ref), torch.float32, "routing weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_and_combine(dtype):
    g = make_generator(5)
    h = (torch.randn(13, 2 * 96, generator=g) * 6).to(dtype).to(DEVICE)  # crosses the clamp limit
    out = swiglu(h, 10.0)
    assert_close(out, ref.swiglu_ref(h[:, :96].cpu(), h[:, 96:].cpu(), 10.0), dtype, "swiglu")
    y = torch.randn(13, 40, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(13, generator=g)[:12].view(4, 3).to(DEVICE)
    weights = torch.rand(4, 3, generator=g).to(DEVICE)
    weights[1, 2] = weights[3, 0] = 0.0  # pairs another rank computes: their rows are never written
    y[slots[1, 2]] = float("nan")
    y[slots[3, 0]] = float("inf")
    out = moe_combine(y, slots, weights)
    assert torch.isfinite(out).all()
    assert_close(out, ref.combine_ref(y.cpu(), slots.cpu(), weights.cpu()), dtype, "combine")


@pytest.mark.parametrize("mlp", [HASH_MOE, ROUTED_MOE])
@pytest.mark.parametrize("n_tok", [1, 9])
def test_grouped_moe_equals_expert_loop(mlp, n_tok):
    cfg = presets.preset("tiny")
    torch.manual_seed(n_tok)
    with torch.device(DEVICE):
        moe = MoE(cfg, mlp, torch.float32)
    for p in moe.parameters():
        p.data.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    if moe.gate.hashed:
        moe.gate.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.num_experts).argsort(1)[:, : cfg.experts_per_token])
    x = torch.randn(n_tok, cfg.hidden_size, device=DEVICE)
    tokens = torch.randint(0, cfg.vocab_size, (n_tok,), device=DEVICE)
    assert_close(moe.grouped(x, tokens), moe(x, tokens), torch.float32, "grouped vs loop")


@pytest.mark.parametrize("n_tok,k1,groups", [(1, 7, 17), (9, 3, 5), (128, 7, 257), (700, 7, 17)],
                         ids=["b1", "b9", "b128-257", "library-sort"])
def test_moe_align_groups_pairs_stably(n_tok, k1, groups):
    from dsv4.kernels.moe.kernel import moe_align

    g = make_generator(n_tok)
    ids = torch.randint(0, groups, (n_tok, k1), generator=g, dtype=torch.int32).to(DEVICE)
    rows, slots, offsets = moe_align(ids, groups)
    flat = ids.flatten().long().cpu()
    order = torch.argsort(flat, stable=True)
    assert torch.equal(rows.cpu().long(), order // k1)
    assert torch.equal(slots.cpu().flatten()[order], torch.arange(flat.numel()))
    assert torch.equal(offsets.cpu().long(), torch.bincount(flat, minlength=groups).cumsum(0))
