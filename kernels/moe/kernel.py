"""MoE kernels around the grouped expert GEMMs: routing, clamped SwiGLU, weighted combine.

`moe_route` writes each token's k routed experts (ties to the lowest id) plus, as column k, the
shared expert (id E, weight 1), so one sort by expert and two grouped GEMMs serve routed and
shared experts alike. `moe_combine` sums a token's k + 1 expert outputs in a fixed order in float32:
no atomics, so a row's result never depends on what else is in the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import cdiv, check_contiguous, check_dtype, next_pow2
from ..kv_format.kernel import round_bf16


@triton.jit
def moe_route_kernel(
    logits_ptr, bias_ptr, tid2eid_ptr, token_ptr, weights_ptr, ids_ptr, num_experts, route_scale,
    K: tl.constexpr, K1_P2: tl.constexpr, BLOCK_E: tl.constexpr, HASHED: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < num_experts
    x = tl.load(logits_ptr + i_t * num_experts + o_e, mask=m_e, other=0.0)
    # softplus (torch's threshold 20) as max(x, 0) + log1p(e^-|x|); log1p by its series where 1 + e rounds
    e = tl.exp(-tl.abs(x))
    log1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)
    score = tl.sqrt(sp)
    if HASHED:
        row = tl.load(token_ptr + i_t).to(tl.int64) * K
    else:
        sel = tl.where(m_e, score + tl.load(bias_ptr + o_e, mask=m_e, other=0.0), float("-inf"))
    o_j = tl.arange(0, K1_P2)
    ids = tl.zeros([K1_P2], dtype=tl.int32) + num_experts  # column K: the shared expert
    picked = tl.zeros([K1_P2], dtype=tl.float32)
    total = 0.0
    for j in tl.static_range(K):
        if HASHED:
            e = tl.load(tid2eid_ptr + row + j).to(tl.int32)
        else:
            e = tl.argmax(sel, 0, tie_break_left=True).to(tl.int32)
            sel = tl.where(o_e == e, float("-inf"), sel)
        w = tl.sum(tl.where(o_e == e, score, 0.0), 0)
        ids = tl.where(o_j == j, e, ids)
        picked = tl.where(o_j == j, w, picked)
        total += w
    weights = tl.where(o_j < K, picked * (route_scale / (total + 1e-20)), 1.0)
    m_j = o_j < K + 1
    tl.store(ids_ptr + i_t * (K + 1) + o_j, ids, mask=m_j)
    tl.store(weights_ptr + i_t * (K + 1) + o_j, weights, mask=m_j)


# m (pairs of the pass) varies with the prompt; M_P2 still takes one variant per power of two
@triton.jit(do_not_specialize=["m"])
def moe_align_kernel(ids_ptr, rows_ptr, slots_ptr, offsets_ptr, m, groups, K1: tl.constexpr, M_P2: tl.constexpr,
                     G_P2: tl.constexpr):
    """One program sorts every token-expert pair by expert (stable): rows of the sorted pairs, the
    sorted slot of each pair, and each expert group's end offset."""
    o = tl.arange(0, M_P2)
    valid = o < m
    ids = tl.load(ids_ptr + o, mask=valid, other=0).to(tl.int64)
    # (expert, pair index) keys sort stably by expert; padding lanes sort after every real group
    key = tl.where(valid, ids, groups) * M_P2 + o
    pair = (tl.sort(key) % M_P2).to(tl.int32)  # sorted position j holds pair `pair[j]`
    tl.store(rows_ptr + o, pair // K1, mask=valid)
    tl.store(slots_ptr + pair, o.to(tl.int64), mask=valid)
    bins = tl.where(valid, ids, 0).to(tl.int32)
    counts = tl.histogram(bins, G_P2) - tl.where(tl.arange(0, G_P2) == 0, tl.sum((~valid).to(tl.int32), 0), 0)
    o_g = tl.arange(0, G_P2)
    tl.store(offsets_ptr + o_g, tl.cumsum(counts, 0), mask=o_g < groups)


@triton.jit
def swiglu_kernel(h_ptr, out_ptr, inter, stride_h, limit, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inter
    g = tl.minimum(tl.load(h_ptr + i_m * stride_h + cols, mask=m, other=0.0).to(tl.float32), limit)
    u = tl.load(h_ptr + i_m * stride_h + inter + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    a = round_bf16(g * tl.sigmoid(g), ROUND_BF16) * u
    tl.store(out_ptr + i_m * inter + cols, a.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def moe_combine_kernel(y_ptr, slots_ptr, weights_ptr, out_ptr, d, K1: tl.constexpr, BLOCK_D: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K1):
        slot = tl.load(slots_ptr + i_t * K1 + j).to(tl.int64)
        w = tl.load(weights_ptr + i_t * K1 + j)
        # a pair of weight 0 adds nothing, whatever its row holds (another rank's expert: never written)
        acc += tl.where(w != 0.0, w * tl.load(y_ptr + slot * d + cols, mask=m, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + i_t * d + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def moe_route(logits: torch.Tensor, topk: int, route_scale: float, *, bias: torch.Tensor | None = None,
              tid2eid: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing for N tokens: (weights `[N, k+1]` float32, ids `[N, k+1]` int32), column k = shared expert.

    logits: `[N, E]` float32 gate logits. Score-routed: `bias` `[E]` float32, top-k of scores + bias,
    ties to the lowest id. Hash-routed: `tid2eid` `[V, k]` and `token_ids` `[N]`. Columns 0..k-1
    equal `reference.route_ref` (as sets per row; this kernel orders them by selection).
    """
    check_dtype("logits", logits, torch.float32)
    assert logits.dim() == 2 and logits.is_contiguous()
    n_tok, num_experts = logits.shape
    hashed = tid2eid is not None
    if hashed:
        assert token_ids is not None and token_ids.shape == (n_tok,) and tid2eid.shape[1] == topk
        check_contiguous(tid2eid=tid2eid, token_ids=token_ids)
    else:
        check_dtype("bias", bias, torch.float32)
        assert bias.shape == (num_experts,) and bias.is_contiguous()
    weights = torch.empty(n_tok, topk + 1, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n_tok, topk + 1, dtype=torch.int32, device=logits.device)
    if n_tok:
        dummy = logits
        moe_route_kernel[(n_tok,)](
            logits, bias if bias is not None else dummy, tid2eid if hashed else dummy, token_ids if hashed else dummy,
            weights, ids, num_experts, route_scale,
            K=topk, K1_P2=next_pow2(topk + 1), BLOCK_E=next_pow2(num_experts), HASHED=hashed, num_warps=4 if logits.is_cuda else 1,
        )
    return weights, ids


# one program sorts up to this many pairs in registers (decode: batch 128 x 7 = 896); a prefill chunk
# (512 x 7) takes the library sort (an H200 test run whose 3,584-pair prefill chunks went through a
# 4096-wide in-register sort did not finish within its time limit)
ALIGN_MAX_PAIRS = 1024  # pairs the one-program kernel sorts; beyond it the library sort


def moe_align(ids: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-expert pairs `ids [N, K1]` (int32) grouped by expert, stably.

    Returns (rows `[N*K1]` int32: the token of each sorted pair, slots `[N, K1]` int64: where each pair
    landed, offsets `[groups]` int32: cumulative group sizes, as `torch._grouped_mm` takes them).
    """
    check_dtype("ids", ids, torch.int32)
    assert ids.dim() == 2 and ids.is_contiguous()
    n_tok, k1 = ids.shape
    m = n_tok * k1
    device = ids.device
    if m > ALIGN_MAX_PAIRS or m == 0:
        flat = ids.flatten().long()
        order = torch.argsort(flat, stable=True)
        slots = torch.empty_like(order).scatter_(0, order, torch.arange(m, device=device))
        counts = torch.zeros(groups, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
        return (order // k1).to(torch.int32), slots.view(n_tok, k1), counts.cumsum(0).to(torch.int32)
    rows = torch.empty(m, dtype=torch.int32, device=device)
    slots = torch.empty(n_tok, k1, dtype=torch.int64, device=device)
    offsets = torch.empty(groups, dtype=torch.int32, device=device)
    moe_align_kernel[(1,)](ids, rows, slots, offsets, m, groups, K1=k1, M_P2=next_pow2(m), G_P2=next_pow2(groups),
                           num_warps=4 if ids.is_cuda else 1)
    return rows, slots, offsets


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """`[M, 2I]` (gate columns first) -> `[M, I]` = `reference.swiglu_ref(gate, up, limit)`."""
    check_dtype("h", h, torch.float32, torch.bfloat16)
    assert h.dim() == 2 and h.stride(1) == 1 and h.shape[1] % 2 == 0
    m, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty(m, inter, dtype=h.dtype, device=h.device)
    if m:
        block = min(1024 if h.is_cuda else 128, next_pow2(inter))
        swiglu_kernel[(m, cdiv(inter, block))](h, out, inter, h.stride(0), limit, BLOCK=block,
                                               ROUND_BF16=h.dtype == torch.bfloat16, num_warps=4 if h.is_cuda else 1)
    return out


def moe_combine(y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[slots[t, j]] in float32, cast to y's dtype: `[N, d]`
    (`reference.combine_ref`: pairs of weight 0 are skipped, their rows may hold anything).

    y: `[M, d]` expert outputs in sorted order; slots: `[N, K1]` int64 rows of y; weights: `[N, K1]` float32.
    """
    check_dtype("y", y, torch.float32, torch.bfloat16)
    check_dtype("weights", weights, torch.float32)
    assert y.dim() == 2 and y.is_contiguous() and slots.shape == weights.shape
    check_contiguous(slots=slots, weights=weights)
    n_tok, k1 = slots.shape
    d = y.shape[1]
    out = torch.empty(n_tok, d, dtype=y.dtype, device=y.device)
    if n_tok:
        block = min(1024 if y.is_cuda else 128, next_pow2(d))
        moe_combine_kernel[(n_tok, cdiv(d, block))](y, slots, weights, out, d, K1=k1, BLOCK_D=block,
                                                    num_warps=4 if y.is_cuda else 1)
    return out


__all__ = ["moe_route", "moe_align", "swiglu", "moe_combine"]
