"""Random `transformers` DeepseekV4 models built in code (no hub), used as the parity oracle."""

from __future__ import annotations

from pathlib import Path

import torch

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
YARN = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}

# like V4_SPEC §6.2, with 32 indexer heads: with 2 (or 8), ReLU often zeroes every head of a score and
# exact ties at the top-k boundary make any two implementations pick different entries
CONFIG_A = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=5, layer_types=[SWA, SWA, CSA, HCA, CSA],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 2, num_attention_heads=4, head_dim=128, partial_rotary_factor=0.5,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    sliding_window=8, compress_rates={CSA: 4, HCA: 16}, index_n_heads=32, index_head_dim=128, index_topk=3,
    hc_mult=4, hc_sinkhorn_iters=20, routed_scaling_factor=1.5, swiglu_limit=10.0, num_nextn_predict_layers=0,
    max_position_embeddings=1048576, rope_parameters=dict(YARN),
)
# CONFIG_A with one layer of each kind and fewer index heads: for the kernel path under the Triton
# interpreter, whose cost grows with layers and heads
CONFIG_KERNELS = dict(CONFIG_A, num_hidden_layers=3, layer_types=[SWA, CSA, HCA],
                      mlp_layer_types=["hash_moe", "moe", "moe"], index_n_heads=8)
# other window, compress rates, top-k and head counts
CONFIG_B = dict(
    vocab_size=700, hidden_size=96, num_hidden_layers=4, layer_types=[HCA, CSA, SWA, CSA],
    mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 2, num_attention_heads=8, head_dim=128, partial_rotary_factor=0.5,
    q_lora_rank=48, o_groups=4, o_lora_rank=24, n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
    sliding_window=24, compress_rates={CSA: 8, HCA: 32}, index_n_heads=64, index_head_dim=128, index_topk=7,
    hc_mult=4, hc_sinkhorn_iters=20, routed_scaling_factor=2.5, swiglu_limit=7.0, num_nextn_predict_layers=0,
    max_position_embeddings=1048576, rope_parameters=dict(YARN), rms_norm_eps=1e-5,
)


def build_hf(config: dict, seed: int = 0):
    """A float32 eager DeepseekV4ForCausalLM whose constant-initialised parameters are randomised."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()})
    model = DeepseekV4ForCausalLM(cfg).eval().float()
    g = torch.Generator().manual_seed(seed + 1)
    experts = cfg.n_routed_experts
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("scale", "hc_scale")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], experts, generator=g).argsort(dim=1)[:, : b.shape[1]])
    return model


def save_hf(model, out: Path) -> Path:
    model.save_pretrained(out)
    return out


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.view(1, -1)).logits[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, per row, worst row."""
    return ((a - b).abs().amax(-1) / b.abs().amax(-1)).max().item()
