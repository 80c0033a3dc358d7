"""Fused sampling kernel against the float32 reference: same tokens, bans, cutoffs, batch invariance."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.sampling import reference as ref
from dsv4.kernels.sampling.kernel import sample_tokens_kernel
from kernel_checks import DEVICE, REAL_SHAPES, make_generator, poison_like

VOCABS = [129280] if REAL_SHAPES else [7, 1000, 4099]


def _case(b: int, vocab: int, seed: int):
    g = make_generator(seed)
    logits = (torch.randn(b, vocab, generator=g) * 3).to(DEVICE)
    temperature = torch.where(torch.arange(b) % 3 == 0, 0.0, torch.rand(b, generator=g) * 2 + 0.1).to(DEVICE)
    seed_lo = torch.randint(0, 2**32, (b,), generator=g).to(DEVICE)
    seed_hi = torch.randint(0, 2**32, (b,), generator=g).to(DEVICE)
    step = torch.randint(0, 10_000, (b,), generator=g).to(DEVICE)
    min_tokens = torch.randint(0, 20_000, (b,), generator=g).to(DEVICE)
    banned = torch.tensor([1, min(5, vocab - 1)], dtype=torch.int32, device=DEVICE)
    return logits, temperature, seed_lo, seed_hi, step, min_tokens, banned


def _reference(logits, temperature, seed_lo, seed_hi, step, min_tokens, banned, cutoff=None):
    host = [t.cpu() for t in (logits, temperature, seed_lo, seed_hi, step, min_tokens, banned)]
    logits, temperature, seed_lo, seed_hi, step, min_tokens, banned = host
    keep = torch.full_like(temperature, float("-inf")) if cutoff is None else cutoff.cpu()
    return ref.sample_ref(ref.ban_tokens(logits, step < min_tokens, banned), temperature, keep,
                          ref.row_keys(seed_lo, seed_hi, step))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "top_k_top_p"])
def test_sampling_kernel_equals_reference(vocab, filtered):
    b = 9
    args = _case(b, vocab, seed=vocab + filtered)
    cutoff = None
    if filtered:
        g = make_generator(3)
        top_k = torch.randint(0, 20, (b,), generator=g).to(DEVICE)
        top_p = (torch.rand(b, generator=g) * 0.9 + 0.1).to(DEVICE)
        banned_logits = ref.ban_tokens(args[0], args[4] < args[5], args[6])
        cutoff = ref.filter_cutoffs(banned_logits, args[1], top_k, top_p)
    out = poison_like((b,), torch.int64)
    sample_tokens_kernel(*args, cutoff=cutoff, out=out)
    expected = _reference(*args, cutoff=cutoff)
    assert torch.equal(out.cpu(), expected), f"{out.tolist()} != {expected.tolist()}"


def test_sampling_kernel_bans_and_is_batch_invariant():
    logits, temperature, seed_lo, seed_hi, step, min_tokens, banned = _case(6, 1000, seed=1)
    logits[:, 1] = 50.0  # banned id 1 would always win
    min_tokens[:3] = step[:3] + 1  # rows 0-2: still before min_tokens
    min_tokens[3:] = 0
    out = sample_tokens_kernel(logits, temperature, seed_lo, seed_hi, step, min_tokens, banned)
    assert (out[:3] != 1).all() and (out[3:] == 1).all()
    for b in range(6):
        alone = sample_tokens_kernel(*(t[b : b + 1] for t in (logits, temperature, seed_lo, seed_hi, step, min_tokens)),
                                     banned)
        assert int(alone[0]) == int(out[b]), f"row {b} alone differs"
