"""Fused per-row RMSNorm + interleaved RoPE (+ the window-ring write), the attention projections' epilogue.

One program normalises one `[D]` row (one token's head): weighted RMSNorm (the shared K=V entry),
unweighted per-head RMSNorm (queries) or none (indexer queries), then rotates the last R dims in
interleaved pairs at the token's position, rounding where the reference rounds. The K=V entry can
be stored straight into its window-ring slot (float pages, or quantized to the FP8 layout), so
decode writes the ring without an intermediate tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_contiguous, check_dtype, next_pow2
from ..kv_format.kernel import quantize_main_store, round_bf16
from ..kv_format.layout import MainLayout

NORM_NONE, NORM_HEAD, NORM_WEIGHTED = 0, 1, 2
STORE_OUT, STORE_RING_FLOAT, STORE_RING_FP8 = 0, 1, 2


@triton.jit
def norm_rope_kernel(
    x_ptr, stride_xt, stride_xh, w_ptr, pos_ptr, inv_freq_ptr,
    out_ptr, stride_ot, stride_oh, ring_ptr, ring_bf16_ptr, ring_page_ptr, window, page_bytes, eps,
    D: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, STORE: tl.constexpr, ROUND_BF16: tl.constexpr,
    SCALE_BYTES: tl.constexpr, SS_P2: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    o_d = tl.arange(0, D)
    x = tl.load(x_ptr + i_t * stride_xt + i_h * stride_xh + o_d).to(tl.float32)
    if NORM == 1:
        f = round_bf16(tl.math.rsqrt(tl.sum(x * x, 0) / D + eps), ROUND_BF16)
        x = round_bf16(x * f, ROUND_BF16)
    elif NORM == 2:
        x = round_bf16(tl.load(w_ptr + o_d) * (x * tl.math.rsqrt(tl.sum(x * x, 0) / D + eps)), ROUND_BF16)
    pos = tl.load(pos_ptr + i_t)
    ev, od = tl.split(tl.reshape(x, [D // 2, 2]))
    o_p = tl.arange(0, D // 2)
    NOPE_PAIRS: tl.constexpr = (D - ROPE) // 2
    freq = tl.load(inv_freq_ptr + (o_p - NOPE_PAIRS), mask=o_p >= NOPE_PAIRS, other=0.0)
    ang = pos.to(tl.float32) * freq
    c = tl.cos(ang)
    s = tl.sin(ang)
    rot_ev = tl.where(o_p >= NOPE_PAIRS, round_bf16(ev * c - od * s, ROUND_BF16), ev)
    rot_od = tl.where(o_p >= NOPE_PAIRS, round_bf16(od * c + ev * s, ROUND_BF16), od)
    y = tl.reshape(tl.join(rot_ev, rot_od), [D])
    if STORE == 0:
        tl.store(out_ptr + i_t * stride_ot + i_h * stride_oh + o_d, y.to(out_ptr.dtype.element_ty))
    else:
        page = tl.load(ring_page_ptr + i_t).to(tl.int64)
        slot = pos % window
        if STORE == 1:
            tl.store(ring_ptr + (page * window + slot) * D + o_d, y.to(ring_ptr.dtype.element_ty))
        else:
            one = tl.arange(0, 1).to(tl.int64)
            quantize_main_store(ring_ptr, ring_bf16_ptr, page * page_bytes + one, slot + one, one == 0,
                                tl.reshape(y, [1, D // 64, 64]), window, D - ROPE, ROPE, SCALE_BYTES, D // 64, SS_P2)


def _launch(x3: torch.Tensor, positions: torch.Tensor, rope_inv_freq: torch.Tensor, weight: torch.Tensor | None,
            eps: float, norm: int, out: torch.Tensor | None, ring: torch.Tensor | None, ring_blocks: torch.Tensor | None,
            window: int) -> None:
    n_tok, n_heads, d = x3.shape
    rope = 2 * rope_inv_freq.shape[0]
    assert d == next_pow2(d) and x3.stride(2) == 1 and rope <= d, f"rows of {d} dims must be a power of two, contiguous"
    check_dtype("positions", positions, torch.int64)
    check_dtype("rope_inv_freq", rope_inv_freq, torch.float32)
    assert positions.shape == (n_tok,)
    check_contiguous(positions=positions, rope_inv_freq=rope_inv_freq)
    if n_tok == 0:
        return
    store, page_bytes, scale_bytes = STORE_OUT, 0, 8
    if ring is not None:
        check_dtype("ring_blocks", ring_blocks, torch.int32)
        assert ring_blocks.shape == (n_tok,) and n_heads == 1
        check_contiguous(ring=ring, ring_blocks=ring_blocks)
        if ring.dtype == torch.uint8:
            lay = MainLayout(d, rope)
            assert rope % 64 == 0 and ring.shape[1] == window * lay.entry_bytes, "FP8 ring pages of `window` entries"
            store, page_bytes, scale_bytes = STORE_RING_FP8, ring.shape[1], lay.scale_bytes
        else:
            assert ring.shape[1:] == (window, d) and ring.dtype == x3.dtype, "float ring [P, window, D] in x's dtype"
            store = STORE_RING_FLOAT
    dummy = positions
    norm_rope_kernel[(n_tok, n_heads)](
        x3, x3.stride(0), x3.stride(1), weight if weight is not None else rope_inv_freq, positions, rope_inv_freq,
        out if out is not None else x3, out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
        ring if ring is not None else dummy, ring.view(torch.bfloat16) if store == STORE_RING_FP8 else dummy,
        ring_blocks if ring_blocks is not None else dummy, window, page_bytes, eps,
        D=d, ROPE=rope, NORM=norm, STORE=store, ROUND_BF16=x3.dtype == torch.bfloat16,
        SCALE_BYTES=scale_bytes, SS_P2=next_pow2(scale_bytes), num_warps=4 if x3.is_cuda else 1,
    )


def head_norm_rope(x: torch.Tensor, positions: torch.Tensor, rope_inv_freq: torch.Tensor, *, num_heads: int,
                   eps: float = 1e-6, normalize: bool = True) -> torch.Tensor:
    """Queries: per-head unweighted RMSNorm (or none) then RoPE at each token's position.

    x: `[N, num_heads * D]` float32/bfloat16, rows may be strided (a slice of a fused GEMM's output);
    positions: `[N]` int64; rope_inv_freq: `[R/2]` float32. Returns contiguous `[N, num_heads, D]`
    = `apply_rope(head_rms_norm(x))` (or `apply_rope(x)` without `normalize`).
    """
    check_dtype("x", x, torch.float32, torch.bfloat16)
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % num_heads == 0
    x3 = x.view(x.shape[0], num_heads, -1) if x.is_contiguous() else x.unflatten(1, (num_heads, -1))
    out = torch.empty(x.shape[0], num_heads, x3.shape[2], dtype=x.dtype, device=x.device)
    _launch(x3, positions, rope_inv_freq, None, eps, NORM_HEAD if normalize else NORM_NONE, out, None, None, 0)
    return out


def kv_norm_rope(x: torch.Tensor, positions: torch.Tensor, rope_inv_freq: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6, *, ring: torch.Tensor | None = None, ring_blocks: torch.Tensor | None = None,
                 window: int = 0) -> torch.Tensor | None:
    """The shared K=V entry: weighted RMSNorm then RoPE, `apply_rope(rms_norm(x, weight))`.

    x: `[N, D]` (rows may be strided); weight: `[D]` float32. With `ring` (the layer's window pool:
    float `[P, window, D]` or FP8 pages `[P, window * entry_bytes]`) and `ring_blocks` (`[N]` int32)
    the entries are stored at slot `position % window` of each token's ring block and None is
    returned; otherwise a new `[N, D]` tensor.
    """
    check_dtype("x", x, torch.float32, torch.bfloat16)
    check_dtype("weight", weight, torch.float32)
    assert x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],)
    out = None if ring is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x.unsqueeze(1), positions, rope_inv_freq, weight.contiguous(), eps, NORM_WEIGHTED,
            out.unsqueeze(1) if out is not None else None, ring, ring_blocks, window)
    return out



@triton.jit
def rms_norm_rows_kernel(x_ptr, stride_x, w_ptr, out_ptr, d, eps, BLOCK: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK)
    m_d = o_d < d
    x = tl.load(x_ptr + i_t * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    y = tl.load(w_ptr + o_d, mask=m_d, other=0.0) * (x * tl.math.rsqrt(tl.sum(x * x, 0) / d + eps))
    tl.store(out_ptr + i_t * d + o_d, y.to(out_ptr.dtype.element_ty), mask=m_d)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`reference.rms_norm(x, weight)` for `[N, D]` rows (may be strided), as a new contiguous tensor."""
    check_dtype("x", x, torch.float32, torch.bfloat16)
    check_dtype("weight", weight, torch.float32)
    assert x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],) and weight.is_contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        rms_norm_rows_kernel[(x.shape[0],)](x, x.stride(0), weight, out, x.shape[1], eps, BLOCK=next_pow2(x.shape[1]),
                                            num_warps=4 if x.is_cuda else 1)
    return out


__all__ = ["head_norm_rope", "kv_norm_rope", "rms_norm_rows"]
