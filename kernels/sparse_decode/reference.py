"""Float32 torch ground truth for sparse decode attention (V4 spec 2.6 with the sink, 2.3 inverse RoPE)."""

from __future__ import annotations

import torch

from ..kv_format.layout import MainLayout
from ..kv_format.reference import dequantize_main_pages_ref


def dequantize_pool_ref(pool: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """A K=V pool in any storage format -> `[num_blocks, E, head_dim]` float32."""
    if pool.dtype == torch.uint8:
        return dequantize_main_pages_ref(pool, head_dim, rope_dim)
    return pool.float()


def rope_angles_ref(position: torch.Tensor | int, rope_inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles `[R/2]` float32 of one position: float32(position) * inv_freq, as the kernels form them."""
    return torch.as_tensor(position, dtype=torch.float32) * rope_inv_freq.float()


def rotate_interleaved_ref(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the LAST 2*len(angles) dims of x `[..., D]` by `angles` `[R/2]`."""
    r = 2 * angles.shape[-1]
    head, tail = x[..., :-r], x[..., -r:]
    ev, od = tail[..., 0::2], tail[..., 1::2]  # [..., R/2]
    c, s = torch.cos(angles), torch.sin(angles)
    out = torch.stack([ev * c - od * s, ev * s + od * c], dim=-1).flatten(-2)
    return torch.cat([head, out], dim=-1)


def attend_with_sink_ref(q: torch.Tensor, keys: torch.Tensor, sink: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """One softmax over keys plus a value-less sink logit per head: q `[H, D]`, keys `[n, D]` (K = V) -> `[H, D]`."""
    logits = (q @ keys.T) * softmax_scale  # [H, n]
    full = torch.cat([logits, sink[:, None]], dim=1)  # [H, n + 1]
    p = torch.softmax(full, dim=1)[:, :-1]  # the sink column only enlarges the denominator
    return p @ keys  # [H, D]


def sparse_decode_ref(
    q: torch.Tensor,
    positions: torch.Tensor,
    ring: torch.Tensor,
    ring_block: torch.Tensor,
    comp: torch.Tensor | None,
    block_table: torch.Tensor | None,
    num_comp: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Reference of `sparse_decode` (same arguments); returns `[B, H, D]` in q's dtype."""
    b_size, _, d = q.shape
    rope_dim = 2 * rope_inv_freq.shape[0]
    ring_f = dequantize_pool_ref(ring, d, rope_dim)  # [num_ring_blocks, W, D]
    window = ring_f.shape[1]
    comp_f = dequantize_pool_ref(comp, d, rope_dim) if comp is not None else None  # [num_blocks, E, D]
    dev = q.device
    out = torch.empty(q.shape, dtype=torch.float32, device=dev)
    for b in range(b_size):
        t = int(positions[b])
        win_pos = torch.arange(max(0, t - window + 1), t + 1, device=dev)
        keys = [ring_f[int(ring_block[b])][win_pos % window]]  # [n_win, D]
        if comp_f is not None and num_comp is not None:
            n = int(num_comp[b])
            ids = topk_idx[b].long() if topk_idx is not None else torch.arange(n, device=dev)
            ids = ids[(ids >= 0) & (ids < n)]  # -1 (and anything not yet visible) is skipped
            e = comp_f.shape[1]
            keys.append(comp_f[block_table[b].long()[ids // e], ids % e])  # [n_sel, D]
        o = attend_with_sink_ref(q[b].float(), torch.cat(keys), sink.float(), softmax_scale)  # [H, D]
        out[b] = rotate_interleaved_ref(o, -rope_angles_ref(t, rope_inv_freq))
    return out.to(q.dtype)


def sparse_decode_flops(num_heads: int, head_dim: int, num_keys: int) -> int:
    """QK^T and P.V: 2 * H * keys * (D + D)."""
    return 2 * num_heads * num_keys * 2 * head_dim


def main_entry_bytes_read(head_dim: int, rope_dim: int, fp8: bool, elem_bytes: int = 2) -> int:
    return MainLayout(head_dim, rope_dim).entry_bytes if fp8 else head_dim * elem_bytes
