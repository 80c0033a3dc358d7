"""Float32 torch ground truth for sparse prefill attention: many queries of one request, same key sets as decode."""

from __future__ import annotations

import torch

from ..sparse_decode.reference import attend_with_sink_ref, dequantize_pool_ref, rope_angles_ref, rotate_interleaved_ref


def sparse_prefill_ref(
    q: torch.Tensor,
    start_pos: int,
    kv: torch.Tensor,
    window: int,
    comp: torch.Tensor | None,
    block_table: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    rate: int,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Reference of `sparse_prefill` (same arguments); returns `[S, H, D]` in q's dtype."""
    s_len, _, d = q.shape
    hist = kv.shape[0] - s_len  # kv row r holds position start_pos - hist + r
    comp_f = dequantize_pool_ref(comp, d, 2 * rope_inv_freq.shape[0]) if comp is not None else None
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for s in range(s_len):
        t = start_pos + s
        lo = max(0, t - window + 1, start_pos - hist)
        keys = [kv[lo - (start_pos - hist) : t + 1 - (start_pos - hist)].float()]  # [n_win, D]
        if comp_f is not None:
            n = (t + 1) // rate
            ids = topk_idx[s].long() if topk_idx is not None else torch.arange(n, device=q.device)
            ids = ids[(ids >= 0) & (ids < n)]
            e = comp_f.shape[1]
            keys.append(comp_f[block_table.long()[ids // e], ids % e])
        o = attend_with_sink_ref(q[s].float(), torch.cat(keys), sink.float(), softmax_scale)
        out[s] = rotate_interleaved_ref(o, -rope_angles_ref(t, rope_inv_freq))
    return out.to(q.dtype)
