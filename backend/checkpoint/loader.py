"""Load a V4 checkpoint from safetensors (single file or sharded with an index) into `Transformer`.

Tensors stream one at a time: each is read, dequantized if it is FP8 / FP4, cast and copied
into its parameter, then dropped, so a model never exists twice in memory. Every problem
(missing, unexpected, mis-shaped or mistyped tensors) is collected and raised once, listing
names and shapes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import ModelConfig, load_config
from ..model.transformer import Transformer
from .names import FUSED_EXPERTS, canonical_name, scale_target
from .quant import dequant_fp4, dequant_fp8_block

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn,)
PACKED_DTYPES = (torch.int8, torch.uint8)


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: the message lists every offending tensor."""


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map every stored tensor name to its file (single `model.safetensors` or an index)."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return files
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {others}: only safetensors are loaded)" if others else ""
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{hint}")


def _dequantize(name: str, tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype in FP8_DTYPES:
        if scale is None:
            raise CheckpointError(f"{name}: FP8 weight without a scale tensor")
        return dequant_fp8_block(tensor, scale, dtype)
    if tensor.dtype in PACKED_DTYPES and scale is not None:
        return dequant_fp4(tensor, scale, dtype)
    return tensor


class _Reader:
    """Open shards lazily and yield (canonical name, tensor) with scales folded in."""

    def __init__(self, files: dict[str, Path], stack: ExitStack):
        self.files, self.stack, self.handles = files, stack, {}
        canonical = {stored: canonical_name(stored) for stored in files}
        weights = set(canonical.values())
        self.scales: dict[str, str] = {}
        self.names: dict[str, str] = {}
        for stored, canon in canonical.items():
            target = scale_target(canon)
            if target is not None and target in weights:
                self.scales[target] = stored
            else:
                self.names[canon] = stored

    def _get(self, stored: str) -> torch.Tensor:
        path = self.files[stored]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, "pt"))
        return self.handles[path].get_tensor(stored)

    def shape_dtype(self, stored: str) -> tuple[tuple[int, ...], str]:
        path = self.files[stored]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, "pt"))
        sl = self.handles[path].get_slice(stored)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, canon: str, dtype: torch.dtype) -> torch.Tensor:
        stored = self.names[canon]
        tensor = self._get(stored)
        scale = self._get(self.scales[canon]) if canon in self.scales else None
        return _dequantize(canon, tensor, scale, dtype)


def _expected(model: Transformer) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update({n: b for n, b in model.named_buffers() if n.endswith("tid2eid")})
    return out


def _split_fused(canon: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """`ffn.experts.gate_up_proj [E, 2I, d]` / `down_proj [E, d, I]` -> per-expert w1, w3 / w2."""
    prefix, kind = FUSED_EXPERTS.match(canon).groups()
    for e in range(tensor.shape[0]):
        if kind == "gate_up_proj":
            gate, up = tensor[e].chunk(2, dim=0)
            yield f"{prefix}.ffn.experts.{e}.w1.weight", gate
            yield f"{prefix}.ffn.experts.{e}.w3.weight", up
        else:
            yield f"{prefix}.ffn.experts.{e}.w2.weight", tensor[e]


def _check_dtype(canon: str, tensor: torch.Tensor) -> str | None:
    if canon.endswith("tid2eid"):
        return None if not tensor.is_floating_point() else f"{canon}: dtype {tensor.dtype}, expected an integer table"
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{canon}: dtype {tensor.dtype} is not a float type (and no quantization scale accompanies it)"
    return None


def load_weights(model: Transformer, model_dir: str | Path, progress: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    expected = _expected(model)
    loaded: set[str] = set()
    problems: list[str] = []
    unexpected: list[str] = []
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        names = sorted(reader.names)
        bar = tqdm(names, desc=f"loading {model_dir.name}", unit="tensor", disable=not progress, leave=False)
        for canon in bar:
            try:
                tensor = reader.read(canon, model.dtype)
            except (CheckpointError, ValueError) as exc:
                problems.append(f"{canon}: {exc}")
                continue
            pieces = _split_fused(canon, tensor) if FUSED_EXPERTS.match(canon) else [(canon, tensor)]
            for name, value in pieces:
                if name not in expected:
                    unexpected.append(f"{name} {list(value.shape)}")
                    continue
                target = expected[name]
                if tuple(value.shape) != tuple(target.shape):
                    problems.append(f"{name}: shape {list(value.shape)}, expected {list(target.shape)}")
                    continue
                bad = _check_dtype(name, value)
                if bad:
                    problems.append(bad)
                    continue
                with torch.no_grad():
                    target.copy_(value.to(target.dtype))
                loaded.add(name)
    missing = [n for n in expected if n not in loaded]
    # the MTP block is optional: transformers does not save it
    if missing and all(n.startswith("mtp.") for n in missing) and not any(n.startswith("mtp.") for n in loaded):
        model.mtp = torch.nn.ModuleList()
        missing = []
    _check_tables(model, problems)
    if missing or unexpected or problems:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} tensor(s): " + ", ".join(f"{n} {list(expected[n].shape)}" for n in missing[:40]))
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): " + ", ".join(unexpected[:40]))
        lines += problems[:40]
        raise CheckpointError(f"checkpoint {model_dir} does not match the model config:\n  " + "\n  ".join(lines))


def _check_tables(model: Transformer, problems: list[str]) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid") and buf.numel():
            lo, hi = int(buf.min()), int(buf.max())
            if lo < 0 or hi >= model.cfg.num_experts:
                problems.append(f"{name}: expert ids span [{lo}, {hi}], outside [0, {model.cfg.num_experts})")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = True, cfg: ModelConfig | None = None) -> Transformer:
    """Config + weights -> a ready `Transformer` in eval mode on `device`."""
    cfg = cfg or load_config(model_dir)
    with torch.device(device):
        model = Transformer(cfg, dtype)
    load_weights(model, model_dir, progress)
    return model.eval()

