"""Tensor names: the release's (canonical here), what `transformers` 5.24 `save_pretrained` writes,
and the `transformers` module names older exports used.

Canonical names are the release's without a prefix: `embed.weight`, `layers.3.attn.wq_a.weight`,
`layers.0.ffn.experts.7.w2.weight`, `hc_head_fn`, `mtp.0.e_proj.weight`, ...
"""

from __future__ import annotations

import re

# module names of the transformers port -> release names (applied in order)
_MODULE_RENAMES = [
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
    (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."),
    (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
    (r"\.mlp\.", ".ffn."),
]

_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
_ATTN_NORM = re.compile(r"^(layers\.\d+|mtp\.\d+)\.attn\.norm\.weight$")
FUSED_EXPERTS = re.compile(r"^(layers\.\d+)\.ffn\.experts\.(gate_up_proj|down_proj)$")
SCALE_SUFFIXES = (".weight_scale_inv", ".scale")


def canonical_name(name: str) -> str:
    """Map any supported checkpoint name to the release's name (unknown names pass through)."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if name.startswith("model."):
        name = name[len("model.") :]
    for pattern, repl in _MODULE_RENAMES:
        name = re.sub(pattern, repl, name)
    # transformers 5.24 writes the attention's kv_norm as `attn.norm`
    if _ATTN_NORM.match(name):
        name = name[: -len("norm.weight")] + "kv_norm.weight"
    return name


def transformers_name(name: str) -> str:
    """The name `transformers` 5.24 `save_pretrained` gives a canonical tensor."""
    inverse = {v: k for k, v in _TOP_LEVEL.items() if k != "lm_head.weight"}
    if name in inverse:
        return inverse[name]
    if name == "head.weight" or name.startswith("mtp."):
        return name
    if name.endswith(".attn.kv_norm.weight"):
        name = name[: -len("kv_norm.weight")] + "norm.weight"
    return "model." + name


def scale_target(name: str) -> str | None:
    """For a quantization scale tensor (`X.scale`, `X.weight_scale_inv`), the weight it scales."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None
