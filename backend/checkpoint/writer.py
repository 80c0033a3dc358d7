"""Write random V4-architecture checkpoints (seeded, deterministic) in either naming scheme.

Every parameter `transformers` initialises to a constant (sinks, position biases, mHC base and
scale, router bias, norm weights) gets random values here, and hash tables map each token to
distinct experts, so every code path computes something non-trivial.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..config import ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import tokenizer_files
from .names import transformers_name
from .quant import quant_fp4, quant_fp8_block

# kept in float32 whatever the checkpoint dtype (as the release and transformers do)
FP32_SUFFIXES = ("attn_sink", ".ape", "_fn", "_base", "_scale", "norm.weight", "gate.bias")
# in the release these stay bf16 next to FP8 linears
BF16_IN_RELEASE = ("compressor.wkv.weight", "compressor.wgate.weight", "weights_proj.weight", "gate.weight", "embed.weight", "head.weight")


def _random_tensor(name: str, shape: torch.Size, cfg: ModelConfig, gen: torch.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device) * std + mean

    if name.endswith("tid2eid"):
        # distinct experts per token: the first k of a random permutation per row
        return torch.rand(shape[0], cfg.num_experts, generator=gen, device=device).argsort(dim=1)[:, : shape[1]].contiguous()
    if name.endswith("attn_sink") or name.endswith(".ape") or name.endswith("_base"):
        return normal(0.5)
    if name.endswith("_scale"):
        return torch.rand(shape, generator=gen, device=device) + 0.5
    if name.endswith("norm.weight"):
        return normal(0.1, 1.0)
    if name.endswith("gate.bias"):
        return normal(0.1)
    if name in ("embed.weight", "head.weight"):
        return normal(1.0 if name == "embed.weight" else 0.05)
    return normal(cfg_std(shape))


@torch.no_grad()
def randomize_weights(model: Transformer, seed: int = 0) -> Transformer:
    """Fill a model in place with the same distributions `write_checkpoint` uses, generated on the
    model's device (no checkpoint on disk: how benchmarks build shapes too large to write)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.endswith("tid2eid"))]
    for name, t in tqdm(tensors, desc="random weights", unit="tensor", leave=False):
        t.copy_(_random_tensor(name, t.shape, model.cfg, gen, model.device).to(t.dtype))
    return model


def cfg_std(shape: torch.Size) -> float:
    """Fan-in scaled init keeps activations O(1) through the stack at any width."""
    return shape[-1] ** -0.5 if len(shape) > 1 else 0.02


def _iter_params(cfg: ModelConfig) -> Iterator[tuple[str, torch.Size]]:
    with torch.device("meta"):
        model = Transformer(cfg, torch.float32)
    for name, p in model.named_parameters():
        yield name, p.shape
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            yield name, b.shape


def _stored(name: str, value: torch.Tensor, dtype: torch.dtype, quantize: bool) -> dict[str, torch.Tensor]:
    """The tensors one parameter becomes on disk (a weight, or a quantized weight plus its scale)."""
    if not value.is_floating_point():
        return {name: value}
    if any(name.endswith(s) for s in FP32_SUFFIXES):
        return {name: value.float()}
    if quantize and name.endswith(".weight") and value.dim() == 2 and not any(name.endswith(s) for s in BF16_IN_RELEASE):
        stem = name[: -len(".weight")]
        if ".ffn.experts." in name:
            q, s = quant_fp4(value)
        else:
            q, s = quant_fp8_block(value)
        return {name: q, stem + ".scale": s}
    return {name: value.to(dtype)}


def write_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     naming: str = "transformers", quantize: bool = False, shard_bytes: int = 2 << 30,
                     progress: bool = True) -> Path:
    """Write config.json, safetensors (sharded with an index above `shard_bytes`) and the tokenizer."""
    if naming not in ("transformers", "official"):
        raise ValueError(f"naming must be 'transformers' or 'official', not {naming!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    params = list(_iter_params(cfg))
    for name, shape in tqdm(params, desc=f"writing {out.name}", unit="tensor", disable=not progress, leave=False):
        value = _random_tensor(name, shape, cfg, gen)
        for stored_name, tensor in _stored(name, value, dtype, quantize).items():
            key = transformers_name(stored_name) if naming == "transformers" else stored_name
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
                _flush(out, shards, len(shards) - 1)
                shards.append({})
                sizes.append(0)
            shards[-1][key] = tensor.contiguous()
            sizes[-1] += nbytes
    _write_shards(out, shards, sizes)
    config = cfg.to_transformers_dict()
    config["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if quantize:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                         "weight_block_size": [128, 128], "activation_scheme": "dynamic", "expert_dtype": "fp4"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for src in tokenizer_files():
        shutil.copyfile(src, out / src.name)
    return out


def _shard_name(i: int, total: int) -> str:
    return "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def _flush(out: Path, shards: list[dict[str, torch.Tensor]], i: int) -> None:
    # written under a temporary name: the final name needs the shard count
    save_file(shards[i], out / f".shard-{i}.tmp", metadata={"format": "pt"})
    shards[i] = {name: torch.empty(0) for name in shards[i]}


def _write_shards(out: Path, shards: list[dict[str, torch.Tensor]], sizes: list[int]) -> None:
    total = len(shards)
    save_file(shards[-1], out / f".shard-{total - 1}.tmp", metadata={"format": "pt"})
    weight_map = {}
    for i, shard in enumerate(shards):
        name = _shard_name(i, total)
        (out / f".shard-{i}.tmp").replace(out / name)
        weight_map.update({k: name for k in shard})
    if total > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
