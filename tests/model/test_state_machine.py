"""Prefill from any position, chunked prefill and batched decode all equal one full forward."""

import pytest
import torch

from dsv4.backend.generate import prefill_prompt

from .oracle import hf_logits, rel_err

LENGTH = 300


def _ids(vocab: int, n: int = LENGTH, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("start", [13, 30, 61])  # not multiples of 4 nor of the HCA rate
def test_prefill_then_token_by_token_decode_equals_full_forward(hf_pair, runner_for, start):
    hf, path = hf_pair
    runner = runner_for(path)
    ids = _ids(hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    seq = runner.new()
    outs = [prefill_prompt(runner.model, runner.storage, seq, ids[:start], all_logits=True)]
    for t in range(start, LENGTH):
        outs.append(runner.model.decode(ids[t : t + 1], [seq], runner.storage))
    assert seq.position == LENGTH
    assert rel_err(torch.cat(outs), ref) < 1e-4


@pytest.mark.parametrize("chunks", [[13, 22, 1, 64, 100, 100], [1, 1, 7, 131, 160], [299, 1]])
def test_uneven_chunked_prefill_equals_full_forward(hf_pair, runner_for, chunks):
    hf, path = hf_pair
    runner = runner_for(path)
    ids = _ids(hf.config.vocab_size)
    seq = runner.new()
    outs, pos = [], 0
    for n in chunks:
        outs.append(runner.model.prefill(ids[pos : pos + n], seq, runner.storage, all_logits=True))
        pos += n
    assert pos == LENGTH
    assert rel_err(torch.cat(outs), hf_logits(hf, ids)) < 1e-4


def test_batched_decode_of_requests_at_different_positions_equals_each_alone(hf_pair, runner_for):
    hf, path = hf_pair
    runner = runner_for(path)
    starts = [5, 17, 64, 133]
    steps = 40
    prompts = [_ids(hf.config.vocab_size, s + steps, seed=20 + i) for i, s in enumerate(starts)]

    def decode_all(batched: bool) -> list[torch.Tensor]:
        seqs = [runner.new() for _ in starts]
        for seq, p, s in zip(seqs, prompts, starts):
            prefill_prompt(runner.model, runner.storage, seq, p[:s])
        outs = [[] for _ in starts]
        for k in range(steps):
            tokens = torch.stack([p[s + k] for p, s in zip(prompts, starts)])
            if batched:
                logits = runner.model.decode(tokens, seqs, runner.storage)
                for i in range(len(starts)):
                    outs[i].append(logits[i])
            else:
                for i, seq in enumerate(seqs):
                    outs[i].append(runner.model.decode(tokens[i : i + 1], [seq], runner.storage)[0])
        return [torch.stack(o) for o in outs]

    alone = decode_all(False)
    runner.reset()
    together = decode_all(True)
    for a, b in zip(alone, together):
        assert rel_err(b, a) < 1e-5
    # and each equals transformers on its own prompt
    for p, s, b in zip(prompts, starts, together):
        assert rel_err(b, hf_logits(hf, p)[s:]) < 1e-4
