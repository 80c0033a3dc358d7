"""Token-axis compression as running per-channel softmax accumulators.

An accumulator is a float32 tensor [..., 3, width] with rows (running max m, sum of
exponentials s, weighted sum w); pooling a window equals `w / s` of its accumulator.
HCA keeps one accumulator per layer (the entry being built). CSA pools overlapping windows:
entry i covers the first halves of window i-1 and the second halves of window i, so it keeps
two: `cur` (entry of the current window) and `nxt` (first halves seen so far of the current
window, which seed the next entry).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NEG_INF = float("-inf")


def acc_empty(shape: tuple[int, ...], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    acc = torch.zeros(*shape, 3, width, dtype=torch.float32, device=device)
    acc[..., 0, :] = NEG_INF
    return acc


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def acc_merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine two accumulators over disjoint slot sets (associative, commutative)."""
    m = torch.maximum(a[..., 0, :], b[..., 0, :])
    m_safe = _finite_or_zero(m)
    fa = torch.exp(a[..., 0, :] - m_safe)
    fb = torch.exp(b[..., 0, :] - m_safe)
    s = a[..., 1, :] * fa + b[..., 1, :] * fb
    w = a[..., 2, :] * fa + b[..., 2, :] * fb
    return torch.stack((m, s, w), dim=-2)


def acc_from_slots(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Accumulator of slots z, a: [..., n, width] (z = gate logits incl. position bias)."""
    z = z.float()
    m = z.amax(dim=-2)
    e = torch.exp(z - _finite_or_zero(m).unsqueeze(-2))
    return torch.stack((m, e.sum(dim=-2), (e * a.float()).sum(dim=-2)), dim=-2)


def acc_pool(acc: torch.Tensor) -> torch.Tensor:
    return acc[..., 2, :] / acc[..., 1, :]


class Emitted(NamedTuple):
    pooled: torch.Tensor  # [n, width] float32, before norm and RoPE
    first_entry: int  # index of the first emitted entry
    state: torch.Tensor  # new accumulators [n_acc, 3, width]


def compress_chunk(a: torch.Tensor, z: torch.Tensor, start: int, rate: int, state: torch.Tensor, overlap: bool) -> Emitted:
    """Feed tokens start..start+S-1 of one request; emit every entry whose window completes.

    a, z: [S, width_in] projected values and gate logits (position bias already added);
    width_in = 2 * width when `overlap` (CSA: first half feeds the next entry, second half the
    current one), else width. state: [n_acc, 3, width] (n_acc 2 for CSA, 1 for HCA).
    """
    seq = a.shape[0]
    width = state.shape[-1]
    lead = start % rate
    first_window = start // rate
    end = start + seq
    num_windows = (lead + seq + rate - 1) // rate
    pad = num_windows * rate - lead - seq
    # align the chunk to window boundaries with slots that weigh nothing (gate -inf)
    z = torch.nn.functional.pad(z.float(), (0, 0, lead, pad), value=NEG_INF).view(num_windows, rate, -1)
    a = torch.nn.functional.pad(a.float(), (0, 0, lead, pad), value=0.0).view(num_windows, rate, -1)
    complete = end // rate - first_window  # windows of this chunk that are now complete
    if not overlap:
        windows = acc_from_slots(z, a)  # [num_windows, 3, width]
        windows[0] = acc_merge(windows[0], state[0])
        pooled = acc_pool(windows[:complete])
        new_state = windows[complete:complete + 1] if complete < num_windows else acc_empty((1,), width, a.device)
        return Emitted(pooled, first_window, new_state)
    firsts = acc_from_slots(z[..., :width], a[..., :width])  # feeds entry w + 1
    seconds = acc_from_slots(z[..., width:], a[..., width:])  # feeds entry w
    firsts[0] = acc_merge(firsts[0], state[1])
    previous = torch.cat([state[0:1], firsts[:-1]], dim=0)  # cur already holds window w0-1 firsts
    entries = acc_merge(previous, seconds)
    pooled = acc_pool(entries[:complete])
    if complete < num_windows:
        new_state = torch.stack((entries[complete], firsts[complete]))
    else:
        new_state = torch.stack((firsts[-1], acc_empty((), width, a.device)))
    return Emitted(pooled, first_window, new_state)


class DecodeEmitted(NamedTuple):
    pooled: torch.Tensor  # [B, width] float32 (meaningful where `emit`)
    emit: torch.Tensor  # [B] bool: this token completed a window
    state: torch.Tensor  # [B, n_acc, 3, width]


def compress_decode(a: torch.Tensor, z: torch.Tensor, positions: torch.Tensor, rate: int, state: torch.Tensor, overlap: bool) -> DecodeEmitted:
    """One token per request: a, z [B, width_in]; positions [B]; state [B, n_acc, 3, width]."""
    width = state.shape[-1]
    emit = (positions + 1) % rate == 0
    one = lambda zz, aa: acc_from_slots(zz.unsqueeze(-2), aa.unsqueeze(-2))  # noqa: E731
    empty = acc_empty((a.shape[0],), width, a.device)
    keep = ~emit.view(-1, 1, 1)
    if not overlap:
        cur = acc_merge(state[:, 0], one(z, a))
        return DecodeEmitted(acc_pool(cur), emit, torch.where(keep, cur, empty).unsqueeze(1))
    cur = acc_merge(state[:, 0], one(z[:, width:], a[:, width:]))
    nxt = acc_merge(state[:, 1], one(z[:, :width], a[:, :width]))
    new_cur = torch.where(keep, cur, nxt)
    new_nxt = torch.where(keep, nxt, empty)
    return DecodeEmitted(acc_pool(cur), emit, torch.stack((new_cur, new_nxt), dim=1))
