"""Next-token sampling, float32 reference: counter-based noise, temperature, top-k / top-p, banned ids.

Sampling is the exponential race: token = argmax_v (p_v / E_v) with E_v ~ Exp(1) i.i.d., which picks v
with probability p_v / sum(p). In logits: argmax_v (logit_v / T - log E_v). The noise E_v is a pure
function of (seed, step, v): a 32-bit integer hash gives a uniform u in (0, 1) and E = -log u. So a
request's token depends only on its own logits, seed and step: never on its row, the batch or the
device stream, and no generator state exists anywhere. The kernel computes the same hash bit for bit.

Integer math stays below 2^63 (32-bit products are split into 16-bit halves) so that torch int64 and
the kernel's uint32 arithmetic agree exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
MUL_A = 0x7FEB352D  # the two multipliers of a well-mixing 32-bit hash ("lowbias32")
MUL_B = 0x846CA68B
STEP_SALT = 0x1E3779B9  # salts below 2^31: plain int32 constants in the kernel
TOKEN_SALT = 0x05EBCA6B
UNIFORM_BITS = 23  # u = (2k + 1) / 2^24 for k < 2^23: exact in float32, never 0 or 1


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash; int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MUL_A)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL_B)
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """A 64-bit seed as its (low, high) 32-bit halves."""
    return seed & MASK32, (seed >> 32) & MASK32


def row_keys(seed_lo: Tensor, seed_hi: Tensor, step: Tensor) -> Tensor:
    """One 32-bit key per row from its seed halves and step `[B]` (int64)."""
    h = mix32((step & MASK32) ^ STEP_SALT)
    h = mix32(h ^ seed_hi)
    return mix32(h ^ seed_lo)


def uniform_noise(keys: Tensor, vocab: int) -> Tensor:
    """u `[B, V]` float32 in (0, 1), a pure function of (row key, token id)."""
    v = mix32(torch.arange(vocab, dtype=torch.int64, device=keys.device) ^ TOKEN_SALT)
    bits = mix32(keys[:, None] ^ v[None, :]) >> (32 - UNIFORM_BITS)
    return (2 * bits + 1).to(torch.float32) * 2.0**-24


def ban_tokens(logits: Tensor, ban_row: Tensor, banned_ids: Tensor) -> Tensor:
    """-inf at `banned_ids` in the rows where `ban_row` is set (EOS before min_tokens)."""
    if banned_ids.numel() == 0:
        return logits
    out = logits.clone()
    cols = out[:, banned_ids.long()]
    out[:, banned_ids.long()] = torch.where(ban_row[:, None], float("-inf"), cols)
    return out


def filter_cutoffs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Per row, the smallest logit top-k and top-p keep (-inf: keep all). `[B]` float32.

    Top-k keeps the k largest; top-p then keeps tokens while the probability mass strictly before
    them (within the top-k, at temperature T) is < top_p, so the first token always stays. Tokens
    tied with the last kept one are kept too (the kernel filters by value).
    """
    logits = logits.float()
    b, vocab = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    ordered = logits.sort(dim=-1, descending=True, stable=True).values  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    in_k = ranks[None, :] < k[:, None]
    probs = torch.softmax((ordered - ordered[:, :1]) / t[:, None], dim=-1) * in_k
    mass_before = (probs.cumsum(dim=-1) - probs) / probs.sum(dim=-1, keepdim=True)
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1))
    last = keep.sum(dim=-1) - 1  # kept tokens are a prefix of the sorted row
    return ordered.gather(1, last[:, None]).squeeze(1)


def sample_ref(logits: Tensor, temperature: Tensor, cutoff: Tensor, keys: Tensor) -> Tensor:
    """Next token per row `[B]` int64 from logits `[B, V]`.

    temperature `[B]` float32 (0 = greedy: argmax, no noise); cutoff `[B]` float32 (logits below it
    are dropped; -inf keeps all); keys `[B]` from `row_keys`. Ties go to the lowest token id.
    """
    logits = logits.float()
    kept = torch.where(logits >= cutoff[:, None], logits, float("-inf"))
    greedy = temperature == 0
    out = kept.argmax(dim=-1)
    sampled = (~greedy).nonzero().flatten()
    if sampled.numel():
        rows = kept[sampled]
        u = uniform_noise(keys[sampled], logits.shape[1])
        race = rows / temperature[sampled, None] - torch.log(-torch.log(u))
        out[sampled] = race.argmax(dim=-1)
    return out
