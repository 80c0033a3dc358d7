"""Float32 torch ground truth for the Lightning-Indexer scores and top-k (V4 spec 2.5)."""

from __future__ import annotations

import torch

from ..kv_format.reference import dequantize_index_pages_ref


def dequantize_index_pool_ref(keys: torch.Tensor, dim: int, key_format: str | None) -> torch.Tensor:
    """Index-key pool in any storage format -> `[num_blocks, E, dim]` float32."""
    if keys.dtype == torch.uint8:
        return dequantize_index_pages_ref(keys, dim, key_format)
    return keys.float()


def gather_keys_ref(pool_f: torch.Tensor, block_row: torch.Tensor, n: int) -> torch.Tensor:
    """Entries 0..n-1 of one request: pool `[P, E, C]`, block_row `[max_blocks]` -> `[n, C]`."""
    e = pool_f.shape[1]
    i = torch.arange(n, device=pool_f.device)
    return pool_f[block_row.to(pool_f.device)[i // e].long(), i % e]


def index_scores_ref(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """score_i = sum_h w_h * relu(q_h . k_i): q `[n_I, C]`, w `[n_I]`, keys `[n, C]` -> `[n]` float32."""
    return torch.relu(keys.float() @ q.float().T) @ w.float()  # [n, n_I] @ [n_I]


def indexer_topk_decode_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    num_visible: torch.Tensor,
    topk: int,
    key_format: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference of `indexer_topk_decode`: (`[B, topk]` int32 indices, -1 padded; per-request scores `[n_b]`)."""
    b_size, _, c = q.shape
    pool_f = dequantize_index_pool_ref(keys, c, key_format)
    out = torch.full((b_size, topk), -1, dtype=torch.int32, device=q.device)
    scores = []
    for b in range(b_size):
        n = int(num_visible[b])
        s = index_scores_ref(q[b], w[b], gather_keys_ref(pool_f, block_table[b], n))  # [n]
        k = min(topk, n)
        out[b, :k] = torch.topk(s, k).indices.to(torch.int32)
        scores.append(s)
    return out, scores


def indexer_topk_prefill_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: int,
    topk: int,
    rate: int = 4,
    key_format: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference of `indexer_topk_prefill`: query s at position start_pos + s sees entries i < (t + 1) // rate."""
    s_len = q.shape[0]
    visible = torch.tensor([(start_pos + s + 1) // rate for s in range(s_len)], dtype=torch.int32)
    return indexer_topk_decode_ref(q, w, keys, block_table[None, :].expand(s_len, -1), visible, topk, key_format)
