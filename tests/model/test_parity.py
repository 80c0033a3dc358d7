"""Our model against transformers' DeepseekV4ForCausalLM on the same random weights (fp32, eager)."""

import torch

from dsv4.backend.generate import generate
from dsv4.backend.sampler import SamplingParams

from .oracle import hf_logits, rel_err

PROMPT_LEN = 320  # crosses 10 HCA windows of config B, 20 of config A, and the window many times


def _prompt(vocab: int, n: int = PROMPT_LEN, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers_at_every_position(hf_pair, runner_for):
    hf, path = hf_pair
    runner = runner_for(path)
    ids = _prompt(hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    ours = runner.full(ids)
    assert ours.shape == ref.shape == (PROMPT_LEN, hf.config.vocab_size)
    # the indexer really selects: more visible entries than top-k at the end of the prompt
    rate = hf.config.compress_rates["compressed_sparse_attention"]
    assert PROMPT_LEN // rate > hf.config.index_topk
    assert rel_err(ours, ref) < 1e-4


def test_greedy_generation_matches_transformers_generate(hf_pair, runner_for):
    hf, path = hf_pair
    ids = _prompt(hf.config.vocab_size, n=37, seed=11)
    with torch.no_grad():
        ref = hf.generate(ids.view(1, -1), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, ids.numel():].tolist()
    out = generate(runner_for(path).model, ids.tolist(), SamplingParams(temperature=0.0, max_tokens=64))
    assert out.token_ids == ref
