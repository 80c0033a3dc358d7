"""Both config.json dialects give the same ModelConfig; bad fields are named with their value."""

import json

import pytest

from dsv4.backend.config import CSA, HASH_MOE, HCA, ROUTED_MOE, SWA, ConfigError, config_from_dict, load_config
from dsv4.backend.presets import preset

RELEASED = {  # the hub config.json of the release (pre-transformers-port keys)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                           "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256, "num_experts_per_tok": 6,
    "n_shared_experts": 1, "moe_intermediate_size": 2048, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0, "num_hash_layers": 3, "num_nextn_predict_layers": 1, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def test_released_dialect_equals_flash_preset():
    cfg = config_from_dict(RELEASED)
    assert cfg == preset("flash")
    assert cfg.layer_types[:4] == (SWA, SWA, CSA, HCA) and len(cfg.layers_of(CSA)) == 21
    assert cfg.mlp_types[:4] == (HASH_MOE, HASH_MOE, HASH_MOE, ROUTED_MOE)
    assert cfg.yarn is not None and cfg.yarn.factor == 16


def test_transformers_dialect_round_trips():
    for name in ("tiny", "flash-mini", "flash", "pro"):
        cfg = preset(name)
        assert config_from_dict(json.loads(json.dumps(cfg.to_transformers_dict()))) == cfg


def test_load_config_reads_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    assert load_config(tmp_path).num_layers == 43
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "change, field, value",
    [
        ({"compress_ratios": [0, 0, 3] + [4] * 41}, "compress_ratios[2]", "3"),
        ({"hidden_size": -4}, "hidden_size", "-4"),
        ({"hidden_size": "4096"}, "hidden_size", "'4096'"),
        ({"num_experts_per_tok": 300}, "experts_per_token", "300"),
        ({"o_groups": 7}, "o_groups", "7"),
        ({"qk_rope_head_dim": 63}, "rope_dim", "63"),
        ({"scoring_func": "softmax"}, "scoring_func", "'softmax'"),
        ({"num_key_value_heads": 8}, "num_key_value_heads", "8"),
        ({"rope_scaling": {"type": "longrope", "factor": 4}}, "rope_parameters.rope_type", "'longrope'"),
        ({"eos_token_id": 200000}, "eos_token_id", "200000"),
        ({"compress_ratios": [0, 4]}, "compress_ratios", "[0, 4]"),
        ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor", "nan"),
    ],
)
def test_bad_fields_are_named_with_their_value(change, field, value):
    raw = dict(RELEASED, **change)
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert f"'{field}'" in str(info.value) and value in str(info.value)


def test_missing_required_field_is_named():
    raw = dict(RELEASED)
    del raw["q_lora_rank"]
    with pytest.raises(ConfigError, match="'q_lora_rank' is missing"):
        config_from_dict(raw)


def test_unknown_layer_type_in_transformers_dialect():
    raw = preset("tiny").to_transformers_dict()
    raw["layer_types"][1] = "mamba"
    with pytest.raises(ConfigError, match=r"layer_types\[1\]' = 'mamba'"):
        config_from_dict(raw)
