"""`DecodeRunner` (persistent rows, device sampling) computes what the plain `Transformer.decode` does,
through joins, leaves and row moves, on the reference path and on the kernels (interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.decode_runner import DecodeRunner, graph_buckets
from dsv4.backend.generate import prefill_prompt
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.model.decode_batch import DecodeBatch
from dsv4.backend.sampler import SamplingParams

from .oracle import CONFIG_KERNELS, build_hf, save_hf

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_hf(build_hf(CONFIG_KERNELS, seed=4), tmp_path_factory.mktemp("runner")), progress=False)


def _prefilled(model, lengths: list[int], kernels: bool):
    # the prompts go in on the reference path (the kernel prefill has its own tests and is slow in
    # the interpreter); `kernels` picks the path the decode steps take
    cache = PagedCache.for_requests(model.cfg, model.dtype, "cpu", len(lengths), 160)
    g = torch.Generator().manual_seed(9)
    seqs, firsts = [], []
    for i, n in enumerate(lengths):
        seq = cache.admit(str(i), 160)
        logits = prefill_prompt(model, cache.storage, seq, torch.randint(0, 512, (n,), generator=g))
        seqs.append(seq)
        firsts.append(int(logits[-1].argmax()))
    cache.storage.use_kernels = kernels
    return cache, seqs, firsts


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_runner_follows_plain_decode_through_leaves_and_moves(model, kernels):
    lengths = [13, 21, 7, 9] if kernels else [13, 40, 7, 29]  # the interpreter is slow
    steps = 4 if kernels else 9
    plain_cache, plain_seqs, firsts = _prefilled(model, lengths, kernels)
    cache, seqs, _ = _prefilled(model, lengths, kernels)
    runner = DecodeRunner(model, cache.storage, capacity=4, max_positions=160, eos_ids=[], cuda_graphs=False)
    rows = {i: runner.add(seq, firsts[i], GREEDY, seed=i, step=1, min_tokens=0) for i, seq in enumerate(seqs)}
    live = list(range(len(lengths)))
    tokens = {i: firsts[i] for i in live}
    for step in range(steps):
        expected = model.decode(torch.tensor([tokens[i] for i in live]), [plain_seqs[i] for i in live],
                                plain_cache.storage).argmax(-1)
        got = runner.step()
        by_request = {i: int(got[rows[i]]) for i in live}
        assert by_request == {i: int(t) for i, t in zip(live, expected)}, f"step {step}"
        tokens.update(by_request)
        if step == 2:  # request 1 leaves: the last row moves into its place
            moved = runner.remove(rows[1])
            assert moved == 3
            rows[3] = rows.pop(1)
            live.remove(1)
    assert [s.position for s in runner.rows()] == [seqs[i].position for i in (0, 3, 2)]
    assert runner.slots.positions[: runner.size].tolist() == [s.position for s in runner.rows()]
    assert runner.slots.tables[:, runner.size:].abs().sum() == 0, "freed rows must hold the null block"


def test_decode_batch_from_seqs_pads_tables_with_the_null_block(model):
    cache, seqs, _ = _prefilled(model, [13, 100], kernels=False)
    batch = DecodeBatch.from_seqs(seqs, "cpu")
    assert batch.positions.tolist() == [13, 100]
    assert batch.csa_table[0, : len(seqs[0].csa_blocks)].tolist() == seqs[0].csa_blocks
    assert (batch.csa_table[0, len(seqs[0].csa_blocks):] == 0).all()
    assert batch.visible(4).tolist() == [14 // 4, 101 // 4]


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
