"""Loading: both naming schemes, shards, FP8/FP4 release quantization, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.backend.checkpoint.loader import CheckpointError, load_model
from dsv4.backend.checkpoint.names import canonical_name
from dsv4.backend.checkpoint.quant import FP8_BLOCK, dequant_fp4, dequant_fp8_block, quant_fp4, quant_fp8_block
from dsv4.backend.checkpoint.writer import BF16_IN_RELEASE
from dsv4.backend.config import ConfigError

from .conftest import Runner

IDS = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(9))


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write(out, tensors: dict, config_src, shards: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_src / "config.json", out / "config.json")
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, out / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, out / fname)
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_transformers_save_pretrained_names_are_what_we_load(hf_a):
    _, path = hf_a
    names = set(_tensors(path))
    assert "model.layers.0.attn.wq_a.weight" in names and "model.hc_head.hc_base" in names
    assert "model.layers.0.ffn.experts.0.w1.weight" in names and "model.layers.0.attn.attn_sink" in names


def test_official_names_sharded_load_and_match(hf_a, tmp_path):
    hf, path = hf_a
    official = {canonical_name(k): v for k, v in _tensors(path).items()}
    assert "embed.weight" in official and "layers.2.attn.kv_norm.weight" in official
    _write(tmp_path / "official", official, path, shards=3)
    ref = Runner(load_model(path, progress=False)).full(IDS)
    ours = Runner(load_model(tmp_path / "official", progress=False)).full(IDS)
    assert torch.equal(ours, ref)


def test_transformers_module_names_load_too(hf_a, tmp_path):
    hf, path = hf_a
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert "model.layers.3.mlp.experts.gate_up_proj" in state  # fused experts, split on load
    _write(tmp_path / "modules", state, path)
    ref = Runner(load_model(path, progress=False)).full(IDS)
    assert torch.equal(Runner(load_model(tmp_path / "modules", progress=False)).full(IDS), ref)


def _release_quantize(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in official.items():
        linear = name.endswith(".weight") and w.dim() == 2 and not name.endswith(BF16_IN_RELEASE)
        if not linear:
            out[name] = w
            continue
        q, s = quant_fp4(w) if ".ffn.experts." in name else quant_fp8_block(w)
        out[name], out[name[: -len(".weight")] + ".scale"] = q, s
    return out


def test_fp8_block_quantized_release_loads_within_quantization_error(hf_a, tmp_path):
    hf, path = hf_a
    official = {canonical_name(k): v for k, v in _tensors(path).items()}
    quantized = _release_quantize(official)
    assert quantized["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert quantized["layers.0.ffn.experts.0.w1.weight"].dtype == torch.int8
    _write(tmp_path / "fp8", quantized, path)
    model = load_model(tmp_path / "fp8", progress=False)
    params = dict(model.named_parameters())
    checked = 0
    for name, w in official.items():
        scale_name = name[: -len(".weight")] + ".scale"
        if not name.endswith(".weight") or scale_name not in quantized:
            continue
        checked += 1
        loaded = params[name].detach()
        scale = quantized[scale_name]
        exact = dequant_fp4(quantized[name], scale, torch.float32) if ".experts." in name else dequant_fp8_block(quantized[name], scale, torch.float32)
        # the loader dequantizes exactly (bitwise) to what the format encodes
        assert torch.equal(loaded, exact), name
        if ".experts." not in name:
            # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 of |w| for normal values, and
            # <= 2^-10 * block scale in the subnormal range (spacing 2^-9 times the scale)
            s = scale.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[: w.shape[0], : w.shape[1]]
            bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10)
            assert ((loaded - w).abs() <= bound + 1e-12).all(), name
    assert checked > 50
    # the loaded model computes exactly what its dequantized weights define ...
    reference = load_model(path, progress=False)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(params[name])
    ours = Runner(model).full(IDS)
    assert torch.equal(ours, Runner(reference).full(IDS))
    # ... and stays close to the unquantized model. Logits are not bounded by the weight error:
    # the indexer's top-k is discrete and FP4 experts move weights by up to a grid step, so a
    # small random model shifts by ~10% (median); a wrong scale layout drops the cosine far lower
    cos = torch.nn.functional.cosine_similarity(ours, Runner(load_model(path, progress=False)).full(IDS), dim=-1)
    assert cos.min() > 0.85 and cos.median() > 0.98


def _broken(tmp_path, hf_a, edit) -> str:
    _, path = hf_a
    tensors = _tensors(path)
    cfg = json.loads((path / "config.json").read_text())
    edit(tensors, cfg)
    out = tmp_path / "broken"
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ConfigError)) as info:
        load_model(out, progress=False)
    return str(info.value)


def test_missing_tensor_is_named(tmp_path, hf_a):
    msg = _broken(tmp_path, hf_a, lambda t, c: t.pop("model.layers.2.attn.indexer.wq_b.weight"))
    assert "missing" in msg and "layers.2.attn.indexer.wq_b.weight" in msg and "[4096, 32]" in msg


def test_wrong_shape_is_named(tmp_path, hf_a):
    def edit(t, c):
        t["model.layers.1.attn.wkv.weight"] = torch.zeros(100, 64)
    msg = _broken(tmp_path, hf_a, edit)
    assert "layers.1.attn.wkv.weight" in msg and "[100, 64]" in msg and "[128, 64]" in msg


def test_wrong_dtype_is_named(tmp_path, hf_a):
    def edit(t, c):
        t["model.layers.0.attn.wq_a.weight"] = torch.zeros(32, 64, dtype=torch.int32)
        t["model.layers.0.ffn.gate.tid2eid"] = t["model.layers.0.ffn.gate.tid2eid"].float()
    msg = _broken(tmp_path, hf_a, edit)
    assert "layers.0.attn.wq_a.weight: dtype torch.int32" in msg and "tid2eid: dtype torch.float32" in msg


def test_unexpected_tensor_is_named(tmp_path, hf_a):
    msg = _broken(tmp_path, hf_a, lambda t, c: t.update({"model.layers.9.attn.wq_a.weight": torch.zeros(2, 2)}))
    assert "unexpected" in msg and "layers.9.attn.wq_a.weight [2, 2]" in msg


def test_unknown_layer_type_is_named(tmp_path, hf_a):
    msg = _broken(tmp_path, hf_a, lambda t, c: c["layer_types"].__setitem__(3, "linear_attention"))
    assert "layer_types[3]" in msg and "linear_attention" in msg


def test_only_safetensors_are_loaded(tmp_path, hf_a):
    _, path = hf_a
    out = tmp_path / "pickle"
    out.mkdir()
    shutil.copy(path / "config.json", out / "config.json")
    torch.save({}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model(out, progress=False)
