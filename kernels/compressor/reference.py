"""Float32 torch ground truth for the compressor (V4 spec 2.4) in the running-accumulator form of docs/KV_CACHE.md.

State of one request: `[A, 3, D]` float32, A = 2 with overlap (CSA) else 1 (HCA); row 0 = running max m,
row 1 = sum of exponentials s, row 2 = weighted sum w; an empty accumulator is (m=-inf, s=0, w=0).
Accumulator 0 builds entry floor(t / rate) (the next to be emitted), accumulator 1 (CSA) the one after.
"""

from __future__ import annotations

import torch

from ..kv_format.reference import write_index_pages_ref, write_main_pages_ref
from ..sparse_decode.reference import rope_angles_ref, rotate_interleaved_ref

ENTRY_FORMATS = ("main_fp8", "index_fp8", "index_fp4")


def empty_state_ref(num_acc: int, dim: int) -> torch.Tensor:
    state = torch.zeros(num_acc, 3, dim)
    state[:, 0] = float("-inf")
    return state


def add_slot_ref(acc: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One slot into accumulator `[3, D]`: m' = max(m, z), s = s e^(m-m') + e^(z-m'), w = w e^(m-m') + e^(z-m') a."""
    m, s, w = acc
    m_new = torch.maximum(m, z)
    decay = torch.exp(m - m_new)  # m = -inf (empty) -> 0
    p = torch.exp(z - m_new)
    return torch.stack([m_new, s * decay + p, w * decay + p * a])


def accumulate_tokens_ref(
    a: torch.Tensor, z: torch.Tensor, position_bias: torch.Tensor, state: torch.Tensor, start_pos: int, rate: int
) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
    """Feed tokens at positions start_pos.. (a, z `[T, width_in]`, bias not yet added) through the accumulators.

    Returns ([(entry index, pooled `[D]` = w / s), ...] for every window completed, new state `[A, 3, D]`).
    """
    state = state.float().clone()
    num_acc, _, d = state.shape
    overlap = num_acc == 2
    assert a.shape[1] == (2 * d if overlap else d)
    pooled = []
    for k in range(a.shape[0]):
        pos = start_pos + k
        zb = z[k].float() + position_bias[pos % rate].float()  # [width_in]
        ak = a[k].float()
        if overlap:
            state[0] = add_slot_ref(state[0], zb[d:], ak[d:])  # second half: the current entry
            state[1] = add_slot_ref(state[1], zb[:d], ak[:d])  # first half: the next entry
        else:
            state[0] = add_slot_ref(state[0], zb, ak)
        if (pos + 1) % rate == 0:
            pooled.append(((pos + 1) // rate - 1, state[0, 2] / state[0, 1]))
            state[0] = state[1] if overlap else empty_state_ref(1, d)[0]
            if overlap:
                state[1] = empty_state_ref(1, d)[0]
    return pooled, state


def finish_entry_ref(
    pooled: torch.Tensor, norm_weight: torch.Tensor, eps: float, rope_inv_freq: torch.Tensor, anchor: int,
    hadamard: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm (weighted), RoPE at the anchor position (interleaved, last dims), optional Hadamard: `[D]` float32."""
    y = pooled.float()
    y = y * torch.rsqrt(y.square().mean() + eps) * norm_weight.float()
    y = rotate_interleaved_ref(y, rope_angles_ref(anchor, rope_inv_freq))
    if hadamard is not None:
        y = y @ hadamard.float()
    return y


def store_entry_ref(pool: torch.Tensor, page: int, row: int, entry: torch.Tensor, entry_format: str | None, rope_dim: int) -> None:
    """Store one finished entry `[D]` into a pool in place (float pools, or uint8 pages of `entry_format`)."""
    if pool.dtype != torch.uint8:
        pool[page, row] = entry.to(pool.dtype)
        return
    ids, slots = torch.tensor([page]), torch.tensor([row])
    if entry_format == "main_fp8":
        write_main_pages_ref(pool, ids, slots, entry[None], rope_dim)
    else:
        write_index_pages_ref(pool, ids, slots, entry[None], entry_format.removeprefix("index_"))


def compressor_prefill_ref(
    a: torch.Tensor, z: torch.Tensor, position_bias: torch.Tensor, norm_weight: torch.Tensor, rope_inv_freq: torch.Tensor,
    state: torch.Tensor, start_pos: int, pool: torch.Tensor, block_table: torch.Tensor, rate: int, eps: float = 1e-6,
    entry_format: str | None = None, hadamard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Reference of `compressor_prefill` for one request's state `[A, 3, D]` (copies; the inputs are not modified).

    Returns (new state, new pool, [(entry index, finished float32 entry), ...]).
    """
    pooled, new_state = accumulate_tokens_ref(a, z, position_bias, state, start_pos, rate)
    pool = pool.clone()
    e = _entries_per_page(pool, norm_weight.shape[0], entry_format, rope_inv_freq.shape[0] * 2)
    entries = []
    for j, p in pooled:
        y = finish_entry_ref(p, norm_weight, eps, rope_inv_freq, j * rate, hadamard)
        store_entry_ref(pool, int(block_table[j // e]), j % e, y, entry_format, 2 * rope_inv_freq.shape[0])
        entries.append((j, y))
    return new_state, pool, entries


def compressor_decode_ref(
    a: torch.Tensor, z: torch.Tensor, position_bias: torch.Tensor, norm_weight: torch.Tensor, rope_inv_freq: torch.Tensor,
    state: torch.Tensor, state_block: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor,
    rate: int, eps: float = 1e-6, entry_format: str | None = None, hadamard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, torch.Tensor]]]]:
    """Reference of `compressor_decode`: one token per request. Returns (new state pool, new pool, entries per request)."""
    state = state.clone()
    entries = []
    for b in range(a.shape[0]):
        sb = int(state_block[b])
        new_state, pool, ent = compressor_prefill_ref(
            a[b : b + 1], z[b : b + 1], position_bias, norm_weight, rope_inv_freq, state[sb], int(positions[b]), pool,
            block_table[b], rate, eps, entry_format, hadamard,
        )
        state[sb] = new_state
        entries.append(ent)
    return state, pool, entries


def windowed_softmax_pool_ref(a: torch.Tensor, z: torch.Tensor, position_bias: torch.Tensor, rate: int, overlap: bool) -> torch.Tensor:
    """The plain definition from position 0: entry i = per-channel softmax over its window's slots, weighted sum.

    CSA (overlap): slots = first halves of tokens rate*(i-1) .. rate*i - 1 and second halves of rate*i .. rate*i + rate - 1.
    HCA: the tokens rate*i .. rate*i + rate - 1. Returns `[T // rate, D]`.
    """
    t_len = a.shape[0]
    d = a.shape[1] // 2 if overlap else a.shape[1]
    zb = z.float() + position_bias.float()[torch.arange(t_len) % rate]  # [T, width_in]
    out = []
    for i in range(t_len // rate):
        own = slice(rate * i, rate * i + rate)
        if overlap:
            zs = [zb[own, d:]]
            vs = [a[own, d:].float()]
            if i > 0:
                prev = slice(rate * (i - 1), rate * i)
                zs.insert(0, zb[prev, :d])
                vs.insert(0, a[prev, :d].float())
            zs, vs = torch.cat(zs), torch.cat(vs)  # [slots, D]
        else:
            zs, vs = zb[own], a[own].float()
        out.append((torch.softmax(zs, dim=0) * vs).sum(0))
    return torch.stack(out) if out else torch.zeros(0, d)


def _entries_per_page(pool: torch.Tensor, dim: int, entry_format: str | None, rope_dim: int) -> int:
    from ..kv_format.layout import IndexLayout, MainLayout

    if pool.dtype != torch.uint8:
        return pool.shape[1]
    if entry_format == "main_fp8":
        return MainLayout(dim, rope_dim).entries_per_page(pool.shape[1])
    return IndexLayout(dim, entry_format.removeprefix("index_")).entries_per_page(pool.shape[1])
