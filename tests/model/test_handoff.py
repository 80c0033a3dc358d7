"""The prefill -> decode handoff: a request exported from one cache and imported into another
(other block ids) continues exactly as if it had stayed; mismatches are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.serving.handoff import HandoffError, StateHeader, export_state, import_state

from .oracle import rel_err

PROMPT = torch.randint(0, 512, (301,), generator=torch.Generator().manual_seed(12))


def _decode(model, cache, seq, tokens):
    return torch.cat([model.decode(tokens[i : i + 1], [seq], cache.storage) for i in range(tokens.shape[0])])


@pytest.mark.parametrize("kv_format", ["float", "fp8"])
def test_imported_state_continues_exactly(hf_a, kv_format):
    model = load_model(hf_a[1], progress=False)
    source = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 2, 512, kv_format=kv_format)
    target = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 3, 512, kv_format=kv_format)
    target.admit("someone else", 512)  # so the imported request gets other block ids
    seq = source.admit("r", 512)
    prefill_prompt(model, source.storage, seq, PROMPT[:280])
    header, payload = export_state(source.storage, seq)
    moved = target.admit("r", 512)
    assert moved.csa_blocks != seq.csa_blocks
    import_state(target.storage, moved, StateHeader.from_tensor(header.to_tensor()), payload.clone())
    assert moved.position == 280
    stayed = _decode(model, source, seq, PROMPT[280:])
    assert rel_err(_decode(model, target, moved, PROMPT[280:]), stayed) == 0.0


def test_mismatched_state_is_refused(hf_a):
    model = load_model(hf_a[1], progress=False)
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 4, 512)
    seq = cache.admit("r", 512)
    prefill_prompt(model, cache.storage, seq, PROMPT[:100])
    header, payload = export_state(cache.storage, seq)
    other = PagedCache.for_requests(model.cfg, model.dtype, "cpu", 2, 512, kv_format="fp8")
    with pytest.raises(HandoffError, match="does not match"):
        import_state(other.storage, other.admit("x", 512), header, payload)
    with pytest.raises(HandoffError, match="bytes"):
        import_state(cache.storage, cache.admit("y", 512), header, payload[:-8])
    with pytest.raises(HandoffError, match="fields"):
        StateHeader.from_tensor(torch.zeros(3, dtype=torch.int64))
    # a header that agrees with a payload of the wrong size: the layout itself finds it
    for cut, words in ((payload[:-8], "shorter than its layout needs"),
                       (torch.cat([payload, payload[:8]]), "8 bytes more than its layout needs")):
        lying = dataclasses.replace(header, payload_bytes=cut.numel())
        with pytest.raises(HandoffError, match=words):
            import_state(cache.storage, cache.admit(f"z{cut.numel()}", 512), lying, cut)
