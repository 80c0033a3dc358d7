"""Per-request sampling parameters and batched next-token sampling on the logits' device.

Sampling is the exponential race with counter-based noise (`dsv4.kernels.sampling`): a row's
token is a pure function of its logits, seed and step, so a seeded request produces the same
tokens whatever shares the batch, in whichever row, and nothing waits for the host. On CUDA one
fused kernel samples every row; elsewhere the float32 reference does the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dsv4.kernels.host_copy import to_device

_MAX_SEED = 2**64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """One request's sampling settings; validated on construction (a list `stop` becomes a tuple).

    temperature: >= 0, 0 means greedy; top_p: in (0, 1], 1 means off; top_k: >= 0, 0 means off;
    seed: None means a random seed drawn when the request arrives; max_tokens: >= 1 generated tokens;
    stop: non-empty strings that end generation (the stop string itself is not emitted).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its value."""

        def fail(name: str, why: str) -> ValueError:
            return ValueError(f"sampling parameter '{name}' = {getattr(self, name)!r}: {why}")

        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise fail("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_real(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise fail("top_p", "must be a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise fail("top_k", "must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            raise fail("seed", f"must be null or an integer in [0, {_MAX_SEED})")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise fail("max_tokens", "must be an integer >= 1")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise fail("stop", "must be a list of non-empty strings")


class SamplingRows(NamedTuple):
    """Per-row sampling inputs as device tensors `[B]` (built once per request, not per step)."""

    temperature: Tensor  # float32, 0 = greedy
    top_k: Tensor  # int64, 0 = off
    top_p: Tensor  # float32, 1 = off
    seed_lo: Tensor  # int64, low 32 bits of the seed
    seed_hi: Tensor  # int64, high 32 bits
    step: Tensor  # int64, tokens generated so far (the noise counter)
    min_tokens: Tensor  # int64, banned ids are dropped while step < min_tokens
    filtered: bool  # some row uses top-k or top-p (host-side flag: no device read needed)

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], min_tokens: list[int] | None,
              device: torch.device | str) -> SamplingRows:
        """From host values (one queued H2D copy per column); `seeds` are resolved 64-bit seeds."""
        n = len(params)
        if len(seeds) != n or len(steps) != n or (min_tokens is not None and len(min_tokens) != n):
            raise ValueError(f"{n} params but {len(seeds)} seeds, {len(steps)} steps"
                             + ("" if min_tokens is None else f", {len(min_tokens)} min_tokens"))
        f32, i64 = torch.float32, torch.int64
        return cls(
            temperature=to_device([float(p.temperature) for p in params], f32, device),
            top_k=to_device([p.top_k for p in params], i64, device),
            top_p=to_device([float(p.top_p) for p in params], f32, device),
            seed_lo=to_device([s & 0xFFFFFFFF for s in seeds], i64, device),
            seed_hi=to_device([(s >> 32) & 0xFFFFFFFF for s in seeds], i64, device),
            step=to_device(steps, i64, device),
            min_tokens=to_device(min_tokens or [0] * n, i64, device),
            filtered=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
        )


def sample(logits: Tensor, rows: SamplingRows, banned_ids: Tensor | None = None) -> Tensor:
    """Next token per row `[B]` int64, on the logits' device.

    logits: `[B, V]`; rows: `SamplingRows` on the same device; banned_ids: `[NB]` int32 token ids
    (EOS) dropped in rows whose step < min_tokens. Greedy rows take the argmax (lowest id on ties);
    others apply temperature, then top-k and top-p, then race with their own noise.
    """
    from dsv4.kernels.sampling import reference

    if logits.dim() != 2 or rows.temperature.shape != (logits.shape[0],):
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, V] with B = {tuple(rows.temperature.shape)} rows")
    if banned_ids is None:
        banned_ids = torch.zeros(0, dtype=torch.int32, device=logits.device)
    cutoff = None
    if rows.filtered:
        banned = reference.ban_tokens(logits.float(), rows.step < rows.min_tokens, banned_ids)
        cutoff = reference.filter_cutoffs(banned, rows.temperature, rows.top_k, rows.top_p)
    if logits.is_cuda:
        from dsv4.kernels.sampling.kernel import sample_tokens_kernel

        return sample_tokens_kernel(logits, rows.temperature, rows.seed_lo, rows.seed_hi, rows.step, rows.min_tokens,
                                    banned_ids, cutoff=cutoff)
    banned = reference.ban_tokens(logits.float(), rows.step < rows.min_tokens, banned_ids)
    keep_all = torch.full_like(rows.temperature, float("-inf"))
    keys = reference.row_keys(rows.seed_lo, rows.seed_hi, rows.step)
    return reference.sample_ref(banned, rows.temperature, keep_all if cutoff is None else cutoff, keys)
