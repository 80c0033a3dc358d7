"""Weight dequantization for release checkpoints.

- FP8 e4m3 weights with one scale per 128x128 block (`scale_inv` / `scale`, float32 or ue8m0):
  w = q * s[block].
- FP4 e2m1 experts: two values per byte (low nibble first), one ue8m0 scale per 32 inputs.
Quantizers are here too: tests and `dsv4-checkpoint --quantize` write such checkpoints.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    s = scale.float().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return s[: shape[0], : shape[1]]


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = weight.shape
    expected = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)} (expected {expected})")
    return (weight.float() * _expand_blocks(scale, (rows, cols), (FP8_BLOCK, FP8_BLOCK))).to(dtype)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols/2] bytes -> [rows, cols] float32 e2m1 values (low nibble is the first value)."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    return FP4_VALUES.to(packed.device)[codes]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    values = unpack_fp4(packed)
    rows, cols = values.shape
    if tuple(scale.shape) != (rows, cols // FP4_BLOCK):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match weight [{rows}, {cols}] (expected [{rows}, {cols // FP4_BLOCK}])")
    return (values * scale.float().repeat_interleave(FP4_BLOCK, dim=1)).to(dtype)


def _pow2_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=floor) / qmax)))


def quant_fp8_block(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize to e4m3 with power-of-two (ue8m0) scales, as the release does."""
    rows, cols = weight.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, FP8_BLOCK, bc, FP8_BLOCK)
    scale = _pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX, 1e-4)
    q = (weight.float() / _expand_blocks(scale, (rows, cols), (FP8_BLOCK, FP8_BLOCK))).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def quant_fp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 with one ue8m0 scale per 32 inputs, round to nearest (ties to the even code)."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // FP4_BLOCK, FP4_BLOCK)
    scale = _pow2_scale(groups.abs().amax(dim=-1), FP4_MAX, FP4_MAX * 2.0**-126)
    x = (groups / scale.unsqueeze(-1)).flatten(1)
    grid = FP4_VALUES[:8]
    dist = (x.abs().unsqueeze(-1) - grid).abs()
    # ties go to the even code (0, 1.0, 2.0, 4.0 have even indices), as round-to-nearest-even does
    code = torch.argmin(dist * 2 + (torch.arange(8) % 2) * 1e-6, dim=-1)
    code = code + 8 * (x < 0).long()
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    return packed.view(torch.int8), scale.to(torch.float8_e8m0fnu)
