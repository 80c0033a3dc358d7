"""Running softmax accumulators equal the windowed softmax pooling, chunked or token by token."""

import pytest
import torch

from dsv4.backend.model.compressor import acc_empty, acc_from_slots, acc_merge, acc_pool, compress_chunk, compress_decode


def _window_pool(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The plain form: per-channel softmax over the window's slots, weighted sum."""
    return (torch.softmax(z, dim=0) * a).sum(dim=0)


def _reference_entries(z, a, rate, overlap):
    """Every complete entry of a whole sequence, computed from full windows (HF layout)."""
    n = z.shape[0] // rate
    width = z.shape[1] // 2 if overlap else z.shape[1]
    out = []
    for i in range(n):
        cur = slice(i * rate, (i + 1) * rate)
        if not overlap:
            out.append(_window_pool(z[cur], a[cur]))
            continue
        zs, as_ = [z[cur, width:]], [a[cur, width:]]
        if i > 0:
            prev = slice((i - 1) * rate, i * rate)
            zs.insert(0, z[prev, :width])
            as_.insert(0, a[prev, :width])
        out.append(_window_pool(torch.cat(zs), torch.cat(as_)))
    return torch.stack(out) if out else z.new_zeros(0, width)


@pytest.mark.parametrize("overlap, rate, width", [(True, 4, 16), (False, 16, 8), (False, 4, 8), (True, 8, 4)])
@pytest.mark.parametrize("chunks", [[67], [1] * 67, [3, 5, 13, 1, 45], [16, 16, 35]])
def test_chunked_accumulators_equal_windowed_softmax(overlap, rate, width, chunks):
    g = torch.Generator().manual_seed(len(chunks) + rate)
    total = sum(chunks)
    width_in = 2 * width if overlap else width
    z, a = torch.randn(total, width_in, generator=g) * 3, torch.randn(total, width_in, generator=g)
    state = acc_empty((2 if overlap else 1,), width)
    got, pos = [], 0
    for n in chunks:
        emitted = compress_chunk(a[pos : pos + n], z[pos : pos + n], pos, rate, state, overlap)
        assert emitted.first_entry == pos // rate
        got.append(emitted.pooled)
        state = emitted.state
        pos += n
    ref = _reference_entries(z, a, rate, overlap)
    assert torch.allclose(torch.cat(got), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overlap, rate", [(True, 4), (False, 16)])
def test_batched_decode_update_equals_chunk_form(overlap, rate):
    g = torch.Generator().manual_seed(3)
    width, batch, steps = 8, 3, 40
    width_in = 2 * width if overlap else width
    z, a = torch.randn(batch, steps, width_in, generator=g), torch.randn(batch, steps, width_in, generator=g)
    starts = [1, 5, 13]  # requests at different positions: prefilled up to there, then decoded together
    states, emitted = [], [[] for _ in range(batch)]
    for b, s in enumerate(starts):
        chunk = compress_chunk(a[b, :s], z[b, :s], 0, rate, acc_empty((2 if overlap else 1,), width), overlap)
        states.append(chunk.state)
        emitted[b].extend(chunk.pooled)
    state = torch.stack(states)
    for k in range(steps - max(starts)):
        positions = torch.tensor([s + k for s in starts])
        idx = torch.arange(batch), positions
        out = compress_decode(a[idx], z[idx], positions, rate, state, overlap)
        state = out.state
        for b in out.emit.nonzero().flatten().tolist():
            emitted[b].append(out.pooled[b])
    for b, s in enumerate(starts):
        ref = _reference_entries(z[b, : s + steps - max(starts)], a[b, : s + steps - max(starts)], rate, overlap)
        assert len(emitted[b]) == ref.shape[0] > 0
        assert torch.allclose(torch.stack(emitted[b]), ref, atol=1e-6)


def test_merge_is_associative_and_handles_empty():
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    whole = acc_from_slots(z, a)
    parts = acc_merge(acc_merge(acc_from_slots(z[:2], a[:2]), acc_empty((), 5)), acc_from_slots(z[2:], a[2:]))
    assert torch.allclose(acc_pool(whole), acc_pool(parts), atol=1e-6)
    assert torch.allclose(acc_pool(whole), _window_pool(z, a), atol=1e-6)
    empty = acc_merge(acc_empty((), 5), acc_empty((), 5))
    assert torch.isneginf(empty[0]).all() and (empty[1:] == 0).all()
