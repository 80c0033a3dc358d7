"""Named model shapes: the released V4-Flash / V4-Pro and the small ones this project makes itself."""

from __future__ import annotations

from dataclasses import replace

from .config import CSA, HASH_MOE, HCA, ROUTED_MOE, SWA, ModelConfig, YarnConfig

VOCAB = 129280
_YARN = YarnConfig(factor=16.0, original_max_position=65536, beta_fast=32.0, beta_slow=1.0)


def _mlp(num_layers: int, num_hash: int) -> tuple[str, ...]:
    return tuple(HASH_MOE if i < num_hash else ROUTED_MOE for i in range(num_layers))


def _flash() -> ModelConfig:
    layers = (SWA, SWA) + (CSA, HCA) * 20 + (CSA,)
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=4096, num_layers=43, num_heads=64, head_dim=512, rope_dim=64,
        q_lora_rank=1024, o_groups=8, o_lora_rank=1024, window=128, layer_types=layers,
        mlp_types=_mlp(43, 3), csa_rate=4, hca_rate=128, index_heads=64, index_head_dim=128,
        index_topk=512, num_experts=256, experts_per_token=6, moe_inter_size=2048,
        routed_scaling_factor=1.5, yarn=_YARN, num_mtp_layers=1,
    )


def _pro() -> ModelConfig:
    layers = (HCA, HCA) + (CSA, HCA) * 29 + (CSA,)
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=7168, num_layers=61, num_heads=128, head_dim=512, rope_dim=64,
        q_lora_rank=1536, o_groups=16, o_lora_rank=1024, window=128, layer_types=layers,
        mlp_types=_mlp(61, 3), csa_rate=4, hca_rate=128, index_heads=64, index_head_dim=128,
        index_topk=1024, num_experts=384, experts_per_token=6, moe_inter_size=3072,
        routed_scaling_factor=2.5, yarn=_YARN, num_mtp_layers=1,
    )


def _flash_mini() -> ModelConfig:
    # V4-Flash dimensions on 4 layers (SWA, CSA, HCA, CSA) with 16 experts: fits one GPU.
    layers = (SWA, CSA, HCA, CSA)
    return replace(_flash(), num_layers=4, layer_types=layers, mlp_types=_mlp(4, 2), num_experts=16, num_mtp_layers=0)


def _tiny() -> ModelConfig:
    # the default served model: real vocabulary, every layer and MoE type, fast on two CPU cores.
    layers = (SWA, CSA, HCA, CSA)
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=128, num_layers=4, num_heads=4, head_dim=128, rope_dim=64,
        q_lora_rank=64, o_groups=2, o_lora_rank=64, window=64, layer_types=layers,
        mlp_types=_mlp(4, 2), csa_rate=4, hca_rate=32, index_heads=32, index_head_dim=128,
        index_topk=16, num_experts=8, experts_per_token=2, moe_inter_size=128,
        routed_scaling_factor=1.5, yarn=_YARN, num_mtp_layers=1,
    )


PRESETS = {"tiny": _tiny, "flash-mini": _flash_mini, "flash": _flash, "pro": _pro}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
