"""bench_e2e's in-process measurements: the longest-sequence probe stops where its KV budget
runs out (not with an error), and the rows of the fanned-out decode batch continue alike."""

from __future__ import annotations

import math

import pytest

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.paged_cache import layout_for
from dsv4.scripts import e2e_inproc


@pytest.fixture(scope="module")
def model(hf_a):
    return load_model(hf_a[1], progress=False)


def test_longest_sequence_stops_at_the_kv_budget(model):
    layout = layout_for(model.cfg, model.dtype, "float")
    spare = 2 * sum(layout.block_bytes)  # what the probe keeps for the pools' null pages
    budget = layout.request_bytes(700).total + spare
    out = e2e_inproc.longest_sequence(model, 4096, budget, "float", chunk=256)
    assert out["stopped"] == "KV budget"
    # as long as the budget holds, to within one 256-position block
    held = layout.request_bytes(out["tokens"] + 8).total  # 8 positions reserved for the timed steps
    assert held + spare <= budget < layout.request_bytes(out["tokens"] + 264).total + spare
    assert out["kv_bytes"] <= budget
    assert math.isfinite(out["decode_step_ms"])


def test_longest_sequence_reaches_a_target_that_fits(model):
    out = e2e_inproc.longest_sequence(model, 300, 64 * 2**20, "float", chunk=128)
    assert (out["tokens"], out["stopped"]) == (300, "target")


def test_handoff_figures_match_the_exported_payload(model):
    done = e2e_inproc.prefill_one(model, e2e_inproc.random_prompt(300, model.cfg.vocab_size, 1), 2, "float", num_rows=2)
    figures = e2e_inproc.handoff(done)
    layout = layout_for(model.cfg, model.dtype, "float")
    # the payload holds the ring, the accumulators and the compressed entries written so far
    assert 0 < figures["bytes"] <= layout.request_bytes(302).total
    assert figures["export_ms"] >= 0 and figures["import_ms"] >= 0
    assert "handoff" not in done.cache.seqs  # the import target is released again


def test_decode_batch_rows_are_copies_of_one_request(model):
    out = e2e_inproc.decode_steps(model, 3, 280, 3, "float")
    assert out["rows_agree"]
    assert out["tokens_per_s"] == pytest.approx(3 / (out["step_ms"] / 1e3))


def test_stream_rates_of_two_made_up_streams():
    from dsv4.scripts.e2e_served import stream_rates

    # stream A sent at 0: first token at 1, then 2 tokens at 2 and 1 at 4; stream B sent at 0.5: first at 3, then 3 at 5
    out = stream_rates([(0.0, [(1.0, 1), (2.0, 2), (4.0, 1)]), (0.5, [(3.0, 1), (5.0, 3)])])
    assert out["ttfts_s"] == [1.0, 2.5] and out["ttft_s"] == 2.5
    assert out["tokens_per_s"] == pytest.approx(6 / 4.0)  # tokens after each first one, from 1 s to 5 s
    # both decoding from 3 s (B's first token) to 4 s (A's last): A's token at 4
    assert out["all_decoding_s"] == 1.0 and out["all_decoding_tokens_per_s"] == pytest.approx(1.0)
    assert out["stream_tokens"] == [4, 4]


def test_streams_through_the_served_engines_in_process(model):
    from dsv4.backend.tokenizer import TextCodec

    out = e2e_inproc.engine_streams(model, TextCodec.load(), streams=3, context=40, tokens=5, chunk=32, budget=64,
                                    max_prompts=2, prefill_gib=0.05)
    assert out["stream_tokens"] == [5, 5, 5]  # every stream made exactly its tokens
    assert len(out["ttfts_s"]) == 3 and all(t > 0 for t in out["ttfts_s"])
    assert out["tokens_per_s"] > 0
