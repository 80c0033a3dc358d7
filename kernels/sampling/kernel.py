"""Fused sampling: bans, value cutoff, temperature, counter-based noise and the argmax race, one pass.

`sample_partial_kernel` gives each (row, vocabulary split) program a contiguous slice of the row and
writes its best (race key, token id); `sample_combine_kernel` picks each row's best split. Splits
are fixed by the vocabulary size alone, and ties always go to the lowest token id, so a row's token
never depends on the batch. The noise is `reference.uniform_noise`, computed in int64 with the same
16-bit split products, so the interpreter and every GPU give the reference's bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import cdiv, check_contiguous, check_dtype
from . import reference as ref

MUL_A = tl.constexpr(ref.MUL_A)
MUL_B = tl.constexpr(ref.MUL_B)
STEP_SALT = tl.constexpr(ref.STEP_SALT)
TOKEN_SALT = tl.constexpr(ref.TOKEN_SALT)
DROP_BITS = tl.constexpr(32 - ref.UNIFORM_BITS)
VOCAB_SPLITS = 16  # programs per row: enough to spread one row over the GPU at batch 1


@triton.jit
def _mul32(x, C: tl.constexpr):
    lo = x * (C & 0xFFFF)
    hi = ((x * (C >> 16)) & 0xFFFF) << 16
    s = lo + hi
    return s - ((s >> 32) << 32)


@triton.jit
def mix32(x):
    """`reference.mix32` on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MUL_A)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL_B)
    return x ^ (x >> 16)


@triton.jit
def sample_partial_kernel(
    logits_ptr, stride_l, temp_ptr, cutoff_ptr, seed_lo_ptr, seed_hi_ptr, step_ptr, min_tokens_ptr, banned_ptr,
    ws_key_ptr, ws_idx_ptr, vocab, per_split,
    NUM_BANNED: tl.constexpr, HAS_CUTOFF: tl.constexpr, BLOCK_V: tl.constexpr, SPLITS: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    temp = tl.load(temp_ptr + i_b)
    step = tl.load(step_ptr + i_b)
    ban = step < tl.load(min_tokens_ptr + i_b)
    key = mix32((step - ((step >> 32) << 32)) ^ STEP_SALT)
    key = mix32(key ^ tl.load(seed_hi_ptr + i_b))
    key = mix32(key ^ tl.load(seed_lo_ptr + i_b))
    cutoff = float("-inf")
    if HAS_CUTOFF:
        cutoff = tl.load(cutoff_ptr + i_b)
    lo = i_s * per_split
    hi = tl.minimum(lo + per_split, vocab)
    o_v = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64) + vocab
    for start in range(lo, hi, BLOCK_V):
        v = start + o_v
        m_v = v < hi
        x = tl.load(logits_ptr + i_b * stride_l + v, mask=m_v, other=float("-inf")).to(tl.float32)
        for j in tl.static_range(NUM_BANNED):
            x = tl.where(ban & (v == tl.load(banned_ptr + j)), float("-inf"), x)
        if HAS_CUTOFF:
            x = tl.where(x >= cutoff, x, float("-inf"))
        if temp > 0:
            bits = mix32(key ^ mix32(v.to(tl.int64) ^ TOKEN_SALT)) >> DROP_BITS
            u = (2 * bits + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
            x = tl.math.div_rn(x, temp) - tl.log(-tl.log(u))
        x = tl.where(m_v, x, float("-inf"))
        tile_best = tl.max(x, 0)
        tile_i = (tl.argmax(x, 0, tie_break_left=True) + start).to(tl.int64)
        take = tile_best > best
        best_i = tl.where(take, tile_i, best_i)
        best = tl.where(take, tile_best, best)
    tl.store(ws_key_ptr + i_b * SPLITS + i_s, best)
    tl.store(ws_idx_ptr + i_b * SPLITS + i_s, best_i)


@triton.jit
def sample_combine_kernel(ws_key_ptr, ws_idx_ptr, out_ptr, SPLITS: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, SPLITS)
    keys = tl.load(ws_key_ptr + i_b * SPLITS + o_s)
    ids = tl.load(ws_idx_ptr + i_b * SPLITS + o_s)
    # splits are in token order: the leftmost best split holds the lowest best token id
    first = tl.argmax(keys, 0, tie_break_left=True)
    tl.store(out_ptr + i_b, tl.sum(tl.where(o_s == first, ids, 0), 0).to(tl.int64))


def sample_tokens_kernel(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    step: torch.Tensor,
    min_tokens: torch.Tensor,
    banned_ids: torch.Tensor,
    cutoff: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row, equal to `reference.sample_ref` after `ban_tokens` (with `row_keys`).

    Args:
        logits: `[B, V]` float32 or bfloat16, rows contiguous.
        temperature: `[B]` float32, 0 = greedy (no noise).
        seed_lo, seed_hi: `[B]` int64, the 32-bit halves of each row's seed.
        step: `[B]` int64, tokens the request has generated (the noise counter).
        min_tokens: `[B]` int64; `banned_ids` are dropped while step < min_tokens.
        banned_ids: `[NB]` int32 (EOS ids), may be empty.
        cutoff: optional `[B]` float32 from `reference.filter_cutoffs` (top-k / top-p).
        out: optional `[B]` int64.

    Returns:
        `[B]` int64 token ids. No host synchronisation; safe to capture in a CUDA graph.
    """
    check_dtype("logits", logits, torch.float32, torch.bfloat16)
    assert logits.dim() == 2 and logits.stride(1) == 1
    b, vocab = logits.shape
    for name, t, dt in (("temperature", temperature, torch.float32), ("seed_lo", seed_lo, torch.int64),
                        ("seed_hi", seed_hi, torch.int64), ("step", step, torch.int64),
                        ("min_tokens", min_tokens, torch.int64)):
        check_dtype(name, t, dt)
        assert t.shape == (b,), f"{name} must be [{b}], got {tuple(t.shape)}"
    check_dtype("banned_ids", banned_ids, torch.int32)
    check_contiguous(temperature=temperature, seed_lo=seed_lo, seed_hi=seed_hi, step=step, min_tokens=min_tokens,
                     banned_ids=banned_ids)
    if cutoff is not None:
        check_dtype("cutoff", cutoff, torch.float32)
        assert cutoff.shape == (b,) and cutoff.is_contiguous()
    if out is None:
        out = torch.empty(b, dtype=torch.int64, device=logits.device)
    assert out.shape == (b,) and out.dtype == torch.int64
    if b == 0:
        return out
    splits = VOCAB_SPLITS
    per_split = cdiv(vocab, splits)
    ws_key = torch.empty(b, splits, dtype=torch.float32, device=logits.device)
    ws_idx = torch.empty(b, splits, dtype=torch.int64, device=logits.device)
    on_gpu = logits.device.type == "cuda"
    sample_partial_kernel[(b, splits)](
        logits, logits.stride(0), temperature, cutoff if cutoff is not None else temperature,
        seed_lo, seed_hi, step, min_tokens, banned_ids, ws_key, ws_idx, vocab, per_split,
        NUM_BANNED=banned_ids.numel(), HAS_CUTOFF=cutoff is not None, BLOCK_V=2048 if on_gpu else 256, SPLITS=splits,
        num_warps=8 if on_gpu else 1,
    )
    sample_combine_kernel[(b,)](ws_key, ws_idx, out, SPLITS=splits, num_warps=1)
    return out


__all__ = ["sample_tokens_kernel"]
