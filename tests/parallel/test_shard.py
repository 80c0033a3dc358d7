"""The shards' outputs of one layer sum to the full layer's (in one process, no collectives), and the
shapes a model cannot split are refused with the option named."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from dsv4.backend.checkpoint.writer import randomize_weights
from dsv4.backend.config import CSA
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.model import kernel_path
from dsv4.backend.model.attention import Attention
from dsv4.backend.model.transformer import Transformer
from dsv4.backend.parallel.group import ParallelConfig, ParallelError
from dsv4.backend.parallel.shard import shard_model
from dsv4.backend.presets import preset

CONFIG = replace(preset("tiny"), vocab_size=512)  # the tiny shapes; a small vocabulary keeps copies cheap
CONFIGS = [ParallelConfig(2, 1), ParallelConfig(1, 2), ParallelConfig(2, 2), ParallelConfig(4, 4), ParallelConfig(4, 1)]


@pytest.fixture(scope="module")
def full():
    return randomize_weights(Transformer(CONFIG), seed=4).eval()


def _shards(model, parallel):
    return [shard_model(copy.deepcopy(model), parallel, rank) for rank in range(parallel.world_size)]


@pytest.mark.parametrize("parallel", CONFIGS, ids=lambda p: f"tp{p.tensor_parallel}-ep{p.expert_parallel}")
@torch.inference_mode()
def test_shards_sum_to_the_full_layer(full, parallel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, CONFIG.hidden_size, generator=g)
    tokens = torch.randint(0, CONFIG.vocab_size, (37,), generator=g)
    layer = CONFIG.layer_types.index(CSA)
    shards = _shards(full, parallel)

    def attention(model, kernels: bool = False):
        cache = PagedCache.for_requests(CONFIG, torch.float32, "cpu", 1, 64)
        cache.storage.use_kernels = kernels
        attend = kernel_path.prefill if kernels else Attention.prefill
        # the kernel path on 13 tokens (three compressed entries): the interpreter is slow
        return attend(model.layers[layer].attn, x[:13] if kernels else x, cache.admit("r", 64), cache.storage)

    sites = [("hash moe", lambda m: m.layers[0].ffn(x, tokens)), ("routed moe", lambda m: m.layers[-1].ffn(x, tokens))]
    if parallel.world_size == 2:  # the kernel path (Triton interpreter on a CPU, slow): each split kind once
        # grouped GEMMs over the rank's stacked experts: width-sliced (tp), whole (ep), whole + sliced shared (both)
        sites += [("hash moe, grouped", lambda m: m.layers[0].ffn(x, tokens, grouped=True)),
                  ("routed moe, grouped", lambda m: m.layers[-1].ffn(x, tokens, grouped=True))]
    if parallel.tensor_parallel > 1:
        sites += [("attention", attention)]
    if parallel == ParallelConfig(2, 2):
        sites += [("attention, kernels", lambda m: attention(m, kernels=True))]
    for site, run in sites:
        summed = sum(run(shard) for shard in shards)
        assert (summed - run(full)).abs().max().item() <= 1e-5, site
    if parallel.tensor_parallel == 1:  # EP alone leaves attention whole on every rank
        assert torch.equal(attention(shards[-1]), attention(full))


def test_shard_holds_its_part():
    model = randomize_weights(Transformer(CONFIG), seed=4)
    shard_model(model, ParallelConfig(4, 4), 1)
    attn, moe = model.layers[0].attn, model.layers[0].ffn
    assert attn.cfg.num_heads == 1 and attn.attn_sink.shape == (1,)
    assert attn.wq_b.weight.shape[0] == CONFIG.head_dim
    assert sum(type(e).__name__ == "Expert" for e in moe.experts) == 2 and moe.experts[2].w1.weight.shape[0] == 128
    assert moe.shared_experts.w1.weight.shape[0] == 32


@pytest.mark.parametrize("parallel,cfg,message", [
    (ParallelConfig(3, 1), CONFIG, "--tensor-parallel 3: the model's 4 attention heads"),
    (ParallelConfig(8, 1), CONFIG, "--tensor-parallel 8: the model's 4 attention heads"),
    (ParallelConfig(3, 1), replace(CONFIG, num_heads=6), "--tensor-parallel 3: the model's 2 output groups"),
    (ParallelConfig(4, 1), replace(CONFIG, moe_inter_size=6), "intermediate width 6"),
    (ParallelConfig(1, 3), CONFIG, "--expert-parallel 3: the model's 8 routed experts"),
])
def test_unsplittable_shapes_are_refused(parallel, cfg, message):
    with pytest.raises(ParallelError, match=message.replace("(", r"\(")):
        parallel.check_model(cfg)


def test_inconsistent_degrees_are_refused():
    with pytest.raises(ParallelError, match="each must be 1 or equal"):
        ParallelConfig(2, 4)
    with pytest.raises(ParallelError, match="--expert-parallel 0"):
        ParallelConfig(1, 0)
    with pytest.raises(ParallelError, match="need one GPU per rank: 2 ranks, 1 GPU"):
        ParallelConfig(2, 2).check_device("cuda", visible_gpus=1)
    ParallelConfig(2, 2).check_device("cuda", visible_gpus=2)  # rank r takes GPU r
    ParallelConfig(2, 2).check_device("cpu", visible_gpus=0)
