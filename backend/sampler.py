"""Per-request sampling parameters and batched next-token sampling.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
probability p_i / sum(p), so probabilities never need renormalising and there is no
`torch.multinomial` host sync. Each row draws its noise from its own generator, so a seeded
request's tokens depend only on its own logits and seed, never on batch position or companions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_MAX_SEED = 2**64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """One request's sampling settings; validated on construction (a list `stop` becomes a tuple).

    temperature: >= 0, 0 means greedy; top_p: in (0, 1], 1 means off; top_k: >= 0, 0 means off;
    seed: None draws from the default generator; max_tokens: >= 1 generated tokens;
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


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator on `device` seeded with `seed`; None (meaning the default generator) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _filter_top_k_top_p(probs: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Zero the probabilities outside each row's top-k, then outside its nucleus of mass top_p.

    probs: [B, V] float32 (unnormalised is fine); top_k: [B] int64 with 0 = off; top_p: [B] float32.
    """
    vocab_size = probs.shape[-1]
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
    ranks = torch.arange(vocab_size, device=probs.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    keep = ranks[None, :] < k[:, None]  # [B, V]
    sorted_probs = sorted_probs * keep
    # nucleus over the top-k mass: keep token i while the mass strictly before it is < top_p,
    # which always keeps the first token; rows with top_p == 1 skip it so rounding cannot drop the tail
    mass = sorted_probs.sum(dim=-1, keepdim=True)
    mass_before = (sorted_probs.cumsum(dim=-1) - sorted_probs) / mass
    in_nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep = keep & in_nucleus
    keep_vocab = torch.empty_like(keep).scatter_(-1, sorted_idx, keep)
    return probs * keep_vocab


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> Tensor:
    """Next token per row.

    logits: [B, V] (cast to float32), on CPU or CUDA; params and generators: one per row, each
    generator None or on the logits' device. Returns [B] int64 on the logits' device. Greedy rows
    (temperature 0) take argmax and consume no randomness; other rows apply temperature, top-k,
    top-p, then the exponential race with noise from their own generator.
    """
    if logits.dim() != 2 or len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [B, V] with B = len(params) = len(generators) "
            f"({len(params)}, {len(generators)})"
        )
    device = logits.device
    for row, generator in enumerate(generators):
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator of row {row} is on {generator.device}, logits are on {device}")
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_ids

    # greedy rows get temperature 1 so their (unused) probabilities stay finite
    temperature = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device)
    # subtracting the row max before dividing keeps tiny temperatures from overflowing
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    if any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        probs = _filter_top_k_top_p(probs, top_k, top_p)

    noise = torch.ones_like(probs)
    for row in sampled_rows:
        noise[row].exponential_(generator=generators[row])
    # Exp(1) can round to 0 in float32; a tiny floor keeps p / E finite for kept tokens
    sampled_ids = (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    greedy = torch.tensor([p.greedy for p in params], device=device)
    return torch.where(greedy, greedy_ids, sampled_ids)
