"""Shared helpers for the kernel tests: device, shape switch, tolerances, poison and paging utilities."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REAL_SHAPES = torch.cuda.is_available() and os.environ.get("DSV4_REAL_SHAPES", "0") == "1"

# Tolerances against the float32 references, one place for all ops (elementwise |out - ref| <= atol + rtol*|ref|).
# - float32 inputs: both sides compute in float32 (the kernel uses IEEE dots); only summation order, exp2 vs
#   exp and the interpreter's numpy kernels differ: ~1e-6 relative, 1e-4 leaves room for long key lists.
# - bfloat16 inputs/outputs: the kernel rounds the softmax weights to bf16 before the P.V product and the
#   output to bf16 (2^-9 relative each); the reference computes in float32 from the same bf16 inputs.
# - FP8/FP4 storage adds nothing: the reference dequantizes exactly the stored bytes.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Elementwise check with the tolerance of `dtype`; NaN or inf anywhere in `out` fails."""
    out = out.float().cpu()
    ref = ref.float().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite values (unwritten output?)"
    tol = TOL[dtype]
    err = (out - ref).abs()
    bound = tol["atol"] + tol["rtol"] * ref.abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; worst at flat {i}: out {out.flatten()[i]:.6g} "
            f"ref {ref.flatten()[i]:.6g} (max abs err {err.max():.3g})"
        )


def poison_like(shape, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer filled with NaN (floats) or a recognisable garbage value (integers)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return torch.full(shape, 0x5A5A5A5A if dtype == torch.int32 else 0x5A, dtype=dtype, device=DEVICE)


def garbage_bytes(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(DEVICE)


def shuffled_block_table(num_blocks_used: list[int], max_blocks: int, pool_blocks: int, generator: torch.Generator,
                         sentinel: int = 2**31 - 1) -> torch.Tensor:
    """Block tables `[B, max_blocks]` int32 over a random permutation of the pool; unused tail = sentinel."""
    assert sum(num_blocks_used) <= pool_blocks
    perm = torch.randperm(pool_blocks, generator=generator)
    table = torch.full((len(num_blocks_used), max_blocks), sentinel, dtype=torch.int32)
    at = 0
    for b, n in enumerate(num_blocks_used):
        table[b, :n] = perm[at : at + n].to(torch.int32)
        at += n
    return table.to(DEVICE)


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape, generator: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(dtype=dtype, device=DEVICE)


def to_storage(values: torch.Tensor, fmt: str, rope_dim: int) -> torch.Tensor:
    """Float pool `[P, E, D]` -> storage: 'fp32'/'bf16' tensors, or 'fp8' plane-layout pages `[P, E * entry_bytes]`."""
    from dsv4.kernels.kv_format import reference as kv_ref

    if fmt == "fp32":
        return values.float().to(DEVICE)
    if fmt == "bf16":
        return values.to(torch.bfloat16).to(DEVICE)
    assert fmt == "fp8", fmt
    p, e, d = values.shape
    packed = kv_ref.quantize_main_ref(values.reshape(p * e, d).float().cpu(), rope_dim)  # [P*E, bytes]
    pages = torch.empty(p, e * packed.shape[1], dtype=torch.uint8)
    ids = torch.arange(p).repeat_interleave(e)
    slots = torch.arange(e).repeat(p)
    kv_ref.scatter_entries_ref(pages, ids, slots, packed, kv_ref.main_planes(d, rope_dim))
    return pages.to(DEVICE)


def spoil_entries(pool: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, head_dim: int, rope_dim: int,
                  generator: torch.Generator) -> None:
    """Overwrite entries that must never be read: NaN in float pools, random bytes (NaN codes included) in FP8."""
    from dsv4.kernels.kv_format import reference as kv_ref

    if len(page_ids) == 0:
        return
    if pool.dtype != torch.uint8:
        pool[page_ids.long().to(pool.device), slots.long().to(pool.device)] = float("nan")
        return
    planes = kv_ref.main_planes(head_dim, rope_dim)
    junk = torch.randint(0, 256, (len(page_ids), sum(planes)), dtype=torch.uint8, generator=generator)
    junk[:, : planes[0]] |= 0x7F  # e4m3 NaN codes
    host = pool.cpu()
    kv_ref.scatter_entries_ref(host, page_ids.cpu(), slots.cpu(), junk, planes)
    pool.copy_(host.to(pool.device))


def spoil_pages(pool: torch.Tensor, page_ids: torch.Tensor, generator: torch.Generator) -> None:
    """Whole unused pages: NaN (float pools) or garbage bytes (FP8 pools)."""
    if len(page_ids) == 0:
        return
    ids = page_ids.long().to(pool.device)
    if pool.dtype == torch.uint8:
        junk = torch.randint(0, 256, (len(page_ids), pool.shape[1]), dtype=torch.uint8, generator=generator)
        pool[ids] = junk.to(pool.device) | 0x7F
    else:
        pool[ids] = float("nan")


def rope_inv_freq(rope_dim: int, theta: float = 160000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)).float().to(DEVICE)
