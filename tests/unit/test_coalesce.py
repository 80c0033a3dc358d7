"""Chunks queued behind decode's sender merge into one response per request, in order, errors apart."""

import random

from dsv4.backend.serving.text_state import OutputChunk, coalesce


def _chunk(text, ids, reason="", n=0):
    return OutputChunk(text, ids, reason, 7, n)


def _stream(rid, rng, length):
    """One request's chunks as the engine would emit them: a token each, the last one final."""
    items, n = [], 0
    for i in range(length):
        n += 1
        tok = rng.randrange(1000)
        items.append((rid, _chunk(f"<{tok}>", [tok], "length" if i == length - 1 else "", n), None))
    return items


def test_interleaved_streams_merge_per_request_and_keep_everything():
    rng = random.Random(5)
    streams = {rid: _stream(rid, rng, rng.randrange(1, 9)) for rid in range(6)}
    queues = {rid: list(items) for rid, items in streams.items()}
    items = []
    while any(queues.values()):  # a random interleaving that keeps each stream's order
        rid = rng.choice([r for r, q in queues.items() if q])
        items.append(queues[rid].pop(0))
    out = coalesce(items)
    assert len(out) == len(streams)  # each stream ended in this drain: one response each
    for rid, chunk, error in out:
        whole = streams[rid]
        assert error is None
        assert chunk.text == "".join(c.text for _, c, _ in whole)
        assert chunk.token_ids == [t for _, c, _ in whole for t in c.token_ids]
        assert (chunk.finish_reason, chunk.num_output_tokens) == ("length", len(whole))
        assert chunk.num_input_tokens == 7


def test_a_final_chunk_closes_its_request_and_errors_stay_apart():
    err = ("INTERNAL", "step failed")
    items = [
        (1, _chunk("a", [1], n=1), None),
        (2, _chunk("x", [9], n=1), None),
        (1, _chunk("b", [2], "stop", 2), None),
        (1, _chunk("", [], "cancelled"), None),  # a late chunk after the final one is not merged into it
        (2, None, err),
        (2, _chunk("y", [8], n=2), None),
    ]
    out = coalesce(items)
    assert [(rid, c.text if c else None, e) for rid, c, e in out] == [
        (1, "ab", None), (2, "x", None), (1, "", None), (2, None, err), (2, "y", None)]
    assert out[0][1].token_ids == [1, 2] and out[0][1].final


def test_nothing_queued_gives_nothing():
    assert coalesce([]) == []
