"""Fused mHC: mixing weights + Sinkhorn + collapse + RMSNorm in one kernel, and the expand in another.

`hc_pre` takes the raw mixing logits `streams.flatten(1).float() @ fn^T` (one GEMM, outside) and
per token: rescales them by the streams' RMS (the reference normalises before the GEMM; the scale
is linear, so after is the same), computes pre / post / comb with every Sinkhorn iteration in
registers, collapses the streams with `pre` and applies the sub-layer's RMSNorm. `hc_post` mixes
the streams with `comb` and adds `post * y`, rounding where the reference's bf16 ops round.
Replaces ~140 launches per site of the reference with two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_contiguous, check_dtype, next_pow2
from ..kv_format.kernel import round_bf16


@triton.jit
def hc_pre_kernel(
    streams_ptr, mixes_ptr, base_ptr, scale_ptr, norm_w_ptr, x_ptr, post_ptr, comb_ptr,
    d, stride_m, norm_eps, hc_eps,
    N_HC: tl.constexpr, ITERS: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, N_HC)
    o_d = tl.arange(0, BLOCK_D)
    s_row = streams_ptr + i_t * N_HC * d
    # pass 1: RMS of the flattened streams
    acc = tl.zeros([N_HC, BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + o_d
        s = tl.load(s_row + o_k[:, None] * d + cols[None, :], mask=(cols < d)[None, :], other=0.0).to(tl.float32)
        acc += s * s
    r = tl.math.rsqrt(tl.sum(tl.sum(acc, 1), 0) / (N_HC * d) + norm_eps)
    m_row = mixes_ptr + i_t * stride_m
    pre = tl.sigmoid(tl.load(m_row + o_k) * r * tl.load(scale_ptr) + tl.load(base_ptr + o_k)) + hc_eps
    if not HEAD:
        post = 2 * tl.sigmoid(tl.load(m_row + N_HC + o_k) * r * tl.load(scale_ptr + 1) + tl.load(base_ptr + N_HC + o_k))
        o_ij = o_k[:, None] * N_HC + o_k[None, :]
        logits = tl.load(m_row + 2 * N_HC + o_ij) * r * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * N_HC + o_ij)
        c = tl.exp(logits - tl.max(logits, 1)[:, None])
        c = c / tl.sum(c, 1)[:, None] + hc_eps
        c = c / (tl.sum(c, 0)[None, :] + hc_eps)
        for _ in range(ITERS - 1):
            c = c / (tl.sum(c, 1)[:, None] + hc_eps)
            c = c / (tl.sum(c, 0)[None, :] + hc_eps)
        tl.store(post_ptr + i_t * N_HC + o_k, post)
        tl.store(comb_ptr + i_t * N_HC * N_HC + o_ij, c)
    # pass 2: RMS of the collapsed stream (as rounded to the model dtype); pass 3: normalise and store
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + o_d
        s = tl.load(s_row + o_k[:, None] * d + cols[None, :], mask=(cols < d)[None, :], other=0.0).to(tl.float32)
        x = round_bf16(tl.sum(pre[:, None] * s, 0), ROUND_BF16)
        sq += x * x
    rr = tl.math.rsqrt(tl.sum(sq, 0) / d + norm_eps)
    for start in range(0, d, BLOCK_D):
        cols = start + o_d
        m_d = cols < d
        s = tl.load(s_row + o_k[:, None] * d + cols[None, :], mask=m_d[None, :], other=0.0).to(tl.float32)
        x = round_bf16(tl.sum(pre[:, None] * s, 0), ROUND_BF16)
        y = tl.load(norm_w_ptr + cols, mask=m_d, other=0.0) * (x * rr)
        tl.store(x_ptr + i_t * d + cols, y.to(x_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def hc_post_kernel(
    streams_ptr, y_ptr, post_ptr, comb_ptr, out_ptr, flat_ptr, d, stride_y,
    N_HC: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr, FLAT: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = cols < d
    o_k = tl.arange(0, N_HC)
    s = tl.load(streams_ptr + i_t * N_HC * d + o_k[:, None] * d + cols[None, :], mask=m_d[None, :], other=0.0).to(tl.float32)
    y = tl.load(y_ptr + i_t * stride_y + cols, mask=m_d, other=0.0).to(tl.float32)
    for k in tl.static_range(N_HC):
        ck = round_bf16(tl.load(comb_ptr + i_t * N_HC * N_HC + o_k * N_HC + k), ROUND_BF16)  # comb[j, k] over j
        pk = round_bf16(tl.load(post_ptr + i_t * N_HC + k), ROUND_BF16)
        mix = round_bf16(tl.sum(ck[:, None] * s, 0), ROUND_BF16)
        o = round_bf16(round_bf16(pk * y, ROUND_BF16) + mix, ROUND_BF16)
        tl.store(out_ptr + i_t * N_HC * d + k * d + cols, o.to(out_ptr.dtype.element_ty), mask=m_d)
        if FLAT:  # the next site's mixing GEMM reads the streams in float32
            tl.store(flat_ptr + i_t * N_HC * d + k * d + cols, o, mask=m_d)


def _check_streams(streams: torch.Tensor) -> tuple[int, int, int]:
    check_dtype("streams", streams, torch.float32, torch.bfloat16)
    assert streams.dim() == 3 and streams.is_contiguous(), f"streams must be contiguous [N, n, d], got {tuple(streams.shape)}"
    n_tok, n_hc, d = streams.shape
    assert n_hc == next_pow2(n_hc), f"hc_mult {n_hc} must be a power of two for the kernels"
    return n_tok, n_hc, d


def hc_pre(
    streams: torch.Tensor, mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
    *, iters: int, hc_eps: float, norm_eps: float, head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Collapse the streams into the sub-layer's normalised input.

    Args:
        streams: `[N, n, d]` float32/bfloat16, contiguous.
        mixes: `[N, M]` float32, raw `streams.flatten(1).float() @ fn^T` (M = 2n + n^2, or n for the head).
        base: `[M]` float32; scale: `[3]` float32 (`[1]` for the head); norm_weight: `[d]` float32.
        iters: Sinkhorn iterations; hc_eps: mHC epsilon; norm_eps: RMSNorm epsilon (both norms).
        head: the final collapse (sigmoid pre only, no post / comb).

    Returns:
        (x `[N, d]` in the streams' dtype = rms_norm(sum_k pre_k X_k) * weight, post `[N, n]`, comb `[N, n, n]`)
        float32; post and comb are None for the head. Equals `reference` + `rms_norm` within float32 rounding.
    """
    n_tok, n_hc, d = _check_streams(streams)
    check_dtype("mixes", mixes, torch.float32)
    width = n_hc if head else 2 * n_hc + n_hc * n_hc
    assert mixes.shape == (n_tok, width) and mixes.stride(1) == 1, f"mixes must be [{n_tok}, {width}]"
    for name, t in (("base", base), ("scale", scale), ("norm_weight", norm_weight)):
        check_dtype(name, t, torch.float32)
    assert base.shape == (width,) and norm_weight.shape == (d,)
    check_contiguous(base=base, scale=scale, norm_weight=norm_weight)
    x = torch.empty(n_tok, d, dtype=streams.dtype, device=streams.device)
    post = comb = None
    if not head:
        post = torch.empty(n_tok, n_hc, dtype=torch.float32, device=streams.device)
        comb = torch.empty(n_tok, n_hc, n_hc, dtype=torch.float32, device=streams.device)
    if n_tok == 0:
        return x, post, comb
    on_gpu = streams.is_cuda
    hc_pre_kernel[(n_tok,)](
        streams, mixes, base, scale, norm_weight, x, post if post is not None else x, comb if comb is not None else x,
        d, mixes.stride(0), norm_eps, hc_eps,
        N_HC=n_hc, ITERS=iters, HEAD=head, BLOCK_D=min(1024 if on_gpu else 128, next_pow2(d)),
        ROUND_BF16=streams.dtype == torch.bfloat16, num_warps=8 if on_gpu else 1,
    )
    return x, post, comb


def hc_post(streams: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            flat: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """New streams `[N, n, d]`: X'_k = post_k * y + sum_j comb[j, k] X_j (the reference's `hc_expand_ref`).

    y: `[N, d]` in the streams' dtype (rows contiguous); post `[N, n]`, comb `[N, n, n]` float32 from `hc_pre`.
    With `flat`, also returns the new streams as float32 `[N, n*d]` (the next mixing GEMM's input,
    written in the same pass instead of by a separate cast).
    """
    n_tok, n_hc, d = _check_streams(streams)
    assert y.shape == (n_tok, d) and y.stride(1) == 1 and y.dtype == streams.dtype
    assert post.shape == (n_tok, n_hc) and comb.shape == (n_tok, n_hc, n_hc)
    check_contiguous(post=post, comb=comb)
    out = torch.empty_like(streams)
    flat_out = torch.empty(n_tok, n_hc * d, dtype=torch.float32, device=streams.device) if flat else None
    if n_tok:
        block_d = min(1024 if streams.is_cuda else 128, next_pow2(d))
        hc_post_kernel[(n_tok, triton.cdiv(d, block_d))](
            streams, y, post, comb, out, flat_out if flat else out, d, y.stride(0),
            N_HC=n_hc, BLOCK_D=block_d, ROUND_BF16=streams.dtype == torch.bfloat16, FLAT=flat,
            num_warps=4 if streams.is_cuda else 1,
        )
    return (out, flat_out) if flat else out


__all__ = ["hc_pre", "hc_post"]
