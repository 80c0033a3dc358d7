"""Model configuration: one frozen, validated dataclass read from either `config.json` dialect.

Two dialects exist in the wild:
- the released one (DeepSeek's hub `config.json`): `compress_ratios` (one entry per layer plus
  the MTP block), `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`;
- the one `transformers` writes: `layer_types`, `mlp_layer_types`, `compress_rates`,
  `rope_parameters` (nested `main` / `compress`), `partial_rotary_factor`.
Both resolve to the same `ModelConfig`. Every problem raises `ConfigError` naming the field and value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SWA = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SWA, CSA, HCA)
HASH_MOE = "hash_moe"
ROUTED_MOE = "moe"
MLP_TYPES = (HASH_MOE, ROUTED_MOE)
_RATIO_TO_LAYER_TYPE = {0: SWA, 4: CSA, 128: HCA}


class ConfigError(ValueError):
    """A config field is missing, mistyped, out of range or inconsistent with another."""


def _fail(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config field '{name}' = {value!r}: {why}")


@dataclass(frozen=True)
class YarnConfig:
    """YaRN frequency interpolation for compressed layers (no cos/sin mscale, as in the release)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    layer_types: tuple[str, ...]
    mlp_types: tuple[str, ...]
    csa_rate: int
    hca_rate: int
    index_heads: int
    index_head_dim: int
    index_topk: int
    num_experts: int
    experts_per_token: int
    moe_inter_size: int
    num_shared_experts: int = 1
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    scoring_func: str = "sqrtsoftplus"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnConfig | None = None
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 0
    bos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.o_groups

    def compress_rate(self, layer: int) -> int:
        """Tokens pooled per compressed entry on this layer (0 for sliding-window-only layers)."""
        kind = self.layer_types[layer]
        return self.csa_rate if kind == CSA else self.hca_rate if kind == HCA else 0

    def layers_of(self, kind: str) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == kind)

    def to_transformers_dict(self) -> dict:
        """The `config.json` `transformers` 5.24 writes for this model (what `dsv4-checkpoint` emits)."""
        rope_compress: dict[str, Any] = {"rope_type": "default"}
        if self.yarn is not None:
            rope_compress = {
                "rope_type": "yarn",
                "factor": self.yarn.factor,
                "original_max_position_embeddings": self.yarn.original_max_position,
                "beta_fast": self.yarn.beta_fast,
                "beta_slow": self.yarn.beta_slow,
                "attention_factor": 1.0,
            }
        partial = self.rope_dim / self.head_dim
        rope_compress.update(rope_theta=self.compress_rope_theta, partial_rotary_factor=partial)
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "partial_rotary_factor": partial,
            "qk_rope_head_dim": self.rope_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window,
            "layer_types": list(self.layer_types),
            "mlp_layer_types": list(self.mlp_types),
            "compress_rates": {CSA: self.csa_rate, HCA: self.hca_rate},
            "index_n_heads": self.index_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "n_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_inter_size,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "scoring_func": self.scoring_func,
            "norm_topk_prob": True,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_parameters": {
                "main": {
                    "rope_type": "default",
                    "rope_theta": self.rope_theta,
                    "partial_rotary_factor": partial,
                },
                "compress": rope_compress,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "dtype": "float32",
        }

    def to_json_dict(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        return out


def _validate(c: ModelConfig) -> None:
    positive = (
        "vocab_size hidden_size num_layers num_heads head_dim rope_dim q_lora_rank o_groups "
        "o_lora_rank window index_heads index_head_dim index_topk num_experts experts_per_token "
        "moe_inter_size hc_mult hc_sinkhorn_iters max_position_embeddings"
    ).split()
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise _fail(name, value, "must be a positive integer")
    for name in ("num_shared_experts", "num_mtp_layers", "bos_token_id"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _fail(name, value, "must be a non-negative integer")
    for name in ("csa_rate", "hca_rate"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 2:
            raise _fail(name, value, "compression rate must be an integer >= 2")
    for name in ("routed_scaling_factor", "swiglu_limit", "rope_theta", "compress_rope_theta", "rms_norm_eps", "hc_eps"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise _fail(name, value, "must be a finite positive number")
    if c.rope_dim % 2 or c.rope_dim > c.head_dim:
        raise _fail("rope_dim", c.rope_dim, f"must be even and <= head_dim ({c.head_dim})")
    if c.index_head_dim < c.rope_dim:
        raise _fail("index_head_dim", c.index_head_dim, f"must be >= rope_dim ({c.rope_dim})")
    if (c.num_heads * c.head_dim) % c.o_groups:
        raise _fail("o_groups", c.o_groups, f"must divide num_heads*head_dim ({c.num_heads * c.head_dim})")
    if c.experts_per_token > c.num_experts:
        raise _fail("experts_per_token", c.experts_per_token, f"exceeds num_experts ({c.num_experts})")
    if c.scoring_func != "sqrtsoftplus":
        raise _fail("scoring_func", c.scoring_func, "only 'sqrtsoftplus' is supported")
    for name, types, allowed in (("layer_types", c.layer_types, LAYER_TYPES), ("mlp_layer_types", c.mlp_types, MLP_TYPES)):
        if len(types) != c.num_layers:
            raise _fail(name, list(types), f"has {len(types)} entries but num_hidden_layers is {c.num_layers}")
        for i, kind in enumerate(types):
            if kind not in allowed:
                raise _fail(f"{name}[{i}]", kind, f"unknown layer type; expected one of {list(allowed)}")
    for eos in c.eos_token_ids:
        if not 0 <= eos < c.vocab_size:
            raise _fail("eos_token_id", eos, f"must lie in [0, vocab_size={c.vocab_size})")
    if c.yarn is not None:
        if not c.yarn.factor > 0 or c.yarn.original_max_position <= 0:
            raise _fail("rope_parameters", asdict(c.yarn), "yarn factor and original_max_position_embeddings must be > 0")


def _require(raw: dict, name: str, kind: type | tuple[type, ...] = int) -> Any:
    if name not in raw:
        raise ConfigError(f"config field '{name}' is missing")
    value = raw[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(name, value, "must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise _fail(name, value, f"must be of type {kind}")
    return value


def _rope_settings(raw: dict, head_dim: int) -> tuple[int, float, float, YarnConfig | None]:
    """(rope_dim, rope_theta, compress_rope_theta, yarn) from either dialect."""
    if "qk_rope_head_dim" in raw:
        rope_dim = _require(raw, "qk_rope_head_dim")
    elif raw.get("partial_rotary_factor") is not None:
        rope_dim = int(round(head_dim * float(raw["partial_rotary_factor"])))
    else:
        rope_dim = 64
    rope_theta = float(raw.get("rope_theta", 10000.0))
    compress_theta = float(raw.get("compress_rope_theta", 160000.0))
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise _fail("rope_parameters", params, "must be an object")
    if isinstance(params.get("compress"), dict):
        rope_theta = float(params.get("main", {}).get("rope_theta", rope_theta))
        params = params["compress"]
        compress_theta = float(params.get("rope_theta", compress_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return rope_dim, rope_theta, compress_theta, None
    if kind != "yarn":
        raise _fail("rope_parameters.rope_type", kind, "only 'yarn' or 'default' is supported")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in params:
            raise ConfigError(f"config field 'rope_parameters.{key}' is missing for yarn")
    attention_factor = params.get("attention_factor", params.get("mscale", 1.0))
    if attention_factor not in (1, 1.0, None):
        raise _fail("rope_parameters.attention_factor", attention_factor, "V4 uses YaRN without mscale (1.0)")
    yarn = YarnConfig(
        factor=float(params["factor"]),
        original_max_position=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast", 32)),
        beta_slow=float(params.get("beta_slow", 1)),
    )
    return rope_dim, rope_theta, compress_theta, yarn


def _layer_types(raw: dict, num_layers: int) -> tuple[str, ...]:
    if raw.get("layer_types") is not None:
        types = raw["layer_types"]
        if not isinstance(types, list):
            raise _fail("layer_types", types, "must be a list")
        return tuple(types[:num_layers]) if len(types) > num_layers else tuple(types)
    if raw.get("compress_ratios") is None:
        raise ConfigError("config needs 'layer_types' or 'compress_ratios' (a per-layer attention schedule)")
    ratios = raw["compress_ratios"]
    if not isinstance(ratios, list) or len(ratios) < num_layers:
        raise _fail("compress_ratios", ratios, f"must list at least num_hidden_layers ({num_layers}) ratios")
    out = []
    for i, r in enumerate(ratios[:num_layers]):
        if r not in _RATIO_TO_LAYER_TYPE:
            raise _fail(f"compress_ratios[{i}]", r, "unknown layer type; expected 0 (SWA), 4 (CSA) or 128 (HCA)")
        out.append(_RATIO_TO_LAYER_TYPE[r])
    return tuple(out)


def _mlp_types(raw: dict, num_layers: int) -> tuple[str, ...]:
    if raw.get("mlp_layer_types") is not None:
        types = raw["mlp_layer_types"]
        if not isinstance(types, list):
            raise _fail("mlp_layer_types", types, "must be a list")
        return tuple(types[:num_layers]) if len(types) > num_layers else tuple(types)
    n_hash = raw.get("num_hash_layers", 3)
    if not isinstance(n_hash, int) or n_hash < 0:
        raise _fail("num_hash_layers", n_hash, "must be a non-negative integer")
    return tuple(HASH_MOE if i < n_hash else ROUTED_MOE for i in range(num_layers))


def config_from_dict(raw: dict) -> ModelConfig:
    """Build a `ModelConfig` from a parsed `config.json` of either dialect."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "deepseek_v4")
    if model_type not in ("deepseek_v4", "deepseek_v4_mini"):
        raise _fail("model_type", model_type, "expected 'deepseek_v4'")
    if raw.get("num_key_value_heads", 1) != 1:
        raise _fail("num_key_value_heads", raw["num_key_value_heads"], "V4 has one shared K=V head")
    num_layers = _require(raw, "num_hidden_layers")
    head_dim = _require(raw, "head_dim")
    rope_dim, rope_theta, compress_theta, yarn = _rope_settings(raw, head_dim)
    rates = raw.get("compress_rates") or {}
    csa_rate = rates.get(CSA, raw.get("compress_rate_csa", 4))
    hca_rate = rates.get(HCA, raw.get("compress_rate_hca", 128))
    eos = raw.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return ModelConfig(
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=_require(raw, "hidden_size"),
        num_layers=num_layers,
        num_heads=_require(raw, "num_attention_heads"),
        head_dim=head_dim,
        rope_dim=rope_dim,
        q_lora_rank=_require(raw, "q_lora_rank"),
        o_groups=_require(raw, "o_groups"),
        o_lora_rank=_require(raw, "o_lora_rank"),
        window=raw.get("sliding_window", 128),
        layer_types=_layer_types(raw, num_layers),
        mlp_types=_mlp_types(raw, num_layers),
        csa_rate=csa_rate,
        hca_rate=hca_rate,
        index_heads=raw.get("index_n_heads", 64),
        index_head_dim=raw.get("index_head_dim", 128),
        index_topk=raw.get("index_topk", 512),
        num_experts=_require(raw, "n_routed_experts"),
        experts_per_token=_require(raw, "num_experts_per_tok"),
        moe_inter_size=_require(raw, "moe_intermediate_size"),
        num_shared_experts=raw.get("n_shared_experts", 1),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.5)),
        swiglu_limit=float(raw.get("swiglu_limit", 10.0)),
        scoring_func=raw.get("scoring_func", "sqrtsoftplus"),
        hc_mult=raw.get("hc_mult", 4),
        hc_sinkhorn_iters=raw.get("hc_sinkhorn_iters", 20),
        hc_eps=float(raw.get("hc_eps", 1e-6)),
        rope_theta=rope_theta,
        compress_rope_theta=compress_theta,
        yarn=yarn,
        max_position_embeddings=raw.get("max_position_embeddings", 1048576),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        num_mtp_layers=raw.get("num_nextn_predict_layers", 0),
        bos_token_id=raw.get("bos_token_id", 0) if raw.get("bos_token_id") is not None else 0,
        eos_token_ids=eos_ids,
        extra={"quantization_config": raw.get("quantization_config")} if raw.get("quantization_config") else {},
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return config_from_dict(raw)
